"""From sampled token ids to what a caller receives: text, stop strings, RequestOutputs.

After each step the scheduler has appended the new tokens (Scheduler.update_from_output);
this turns them into output for the request's owner:

    detokenize     each sequence's new token, incrementally (kvlab.engine.detokenizer)
    stop strings   searched only where one can end (the new text, plus the longest stop
                   string's length - 1 before it); the text is cut before the match and the
                   sequence is finished through the scheduler (its blocks are freed)
    outputs        one RequestOutput per request that progressed: everything so far
                   (CUMULATIVE), only the new part (DELTA, streaming), or nothing until the
                   end (FINAL_ONLY, LLM.generate); text that may still become a stop string
                   is held back until it cannot. With stream_interval k > 1 (EngineArgs,
                   `--stream-interval`) a request reports its first tokens at once, then only
                   once k new tokens wait, or at its end: every output costs Python work here,
                   a message to the server and an event to the client, so fewer, larger
                   outputs leave more of each step to the GPU

vLLM runs the same work (its OutputProcessor) in the front-end process; kvlab runs it in
the engine, where, with asynchronous scheduling, it overlaps with the next step on the GPU.
"""

from __future__ import annotations

import time

from kvlab.engine.detokenizer import IncrementalDetokenizer
from kvlab.engine.outputs import CompletionOutput, RequestOutput
from kvlab.engine.sampling_params import RequestOutputKind
from kvlab.engine.scheduler import Scheduler
from kvlab.engine.sequence import Request, Sequence, SequenceStatus


class OutputProcessor:
    def __init__(self, scheduler: Scheduler, tokenizer=None, stream_interval: int = 1):
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.stream_interval = stream_interval

    def process(self, advanced: list[Sequence], logprobs: dict, failed: dict[str, str]) -> list[RequestOutput]:
        """advanced: sequences that received a token in this step (in order); logprobs: their
        (chosen, top-k) where asked; failed: {request_id: message} of requests the engine could not
        run (they end with finish_reason "error"). Returns the RequestOutputs to hand out."""
        now = time.perf_counter()
        touched: dict[str, Request] = {}                  # requests that have something to report
        interval, final_only = self.stream_interval, RequestOutputKind.FINAL_ONLY
        for seq in advanced:
            request = seq.request
            if seq.status is SequenceStatus.FINISHED:
                touched[request.request_id] = request
            elif request.params.output_kind is not final_only:   # streamed: the first tokens, then every k
                unsent = len(seq.token_ids) - seq.num_prompt_tokens - seq.num_tokens_sent
                if seq.num_tokens_sent == 0 or unsent >= interval:
                    touched[request.request_id] = request
            if seq.seq_id in logprobs:
                chosen, tops = logprobs[seq.seq_id]
                seq.cumulative_logprob += chosen
                seq.logprobs.append({seq.token_ids[-1]: chosen, **tops})
            m = request.metrics
            m.num_generation_tokens += 1
            if m.first_token_time is None:
                m.first_token_time = now
            m.last_token_time = now
            if self.tokenizer is not None:
                try:
                    self._detokenize(seq)
                except Exception as err:                  # noqa: BLE001 -- this request fails, not the step
                    failed[request.request_id] = f"detokenizing failed: {type(err).__name__}: {err}"
                if seq.finished:
                    touched[request.request_id] = request     # a stop string ended it
        for request_id, message in failed.items():
            request = self.scheduler.requests.get(request_id)
            if request is not None:
                self.scheduler.abort(request_id, "error", message)
                touched[request_id] = request
        outputs = []
        for request in touched.values():
            if request.finished:
                request.metrics.finished_time = now
                self.scheduler.pop_finished_request(request.request_id)
            o = self.request_output(request)
            if o is not None:
                outputs.append(o)
        return outputs

    def _detokenize(self, seq: Sequence) -> None:
        """Add the sequence's newest token to its text; end it if a stop string appeared."""
        if seq.detokenizer is None:                  # a sample forked in this step starts its own
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, seq.request.prompt_token_ids,
                                                     seq.params.skip_special_tokens)
        final = seq.finished                         # the scheduler ended it (EOS, length, stop token)
        new = seq.detokenizer.add([seq.token_ids[-1]], final=final)
        seq.text += new
        stops = seq.params.stop_strings
        if stops and new and not final:
            window = seq.text[-(len(new) + seq.params.max_stop_string_len - 1):]   # where a stop string can end
            offset = len(seq.text) - len(window)
            hits = [(window.find(s), s) for s in stops if s in window]
            if hits:
                idx, s = min(hits)
                seq.text = seq.text[:offset + idx]               # the stop string is not part of the text
                self.scheduler.finish(seq, "stop", s)

    def request_output(self, request: Request) -> RequestOutput | None:
        params = request.params
        kind = params.output_kind
        done = request.finished
        if kind == RequestOutputKind.FINAL_ONLY and not done:
            return None
        completions = []
        for seq in request.sequences:                     # in index order: sequences[i].index == i
            text, start = seq.text, seq.num_prompt_tokens       # the output: token_ids[start:]
            if params.stop_strings and seq.status is not SequenceStatus.FINISHED:   # hold back what may
                text = text[:max(0, len(text) - params.max_stop_string_len + 1)]      # become a stop string
            num_output = len(seq.token_ids) - start
            if kind == RequestOutputKind.DELTA:
                new_text, ids = text[seq.num_text_sent:], seq.token_ids[start + seq.num_tokens_sent:]
                seq.num_text_sent = len(text)
                text = new_text
                lps = seq.logprobs[len(seq.logprobs) - len(ids):] if params.logprobs is not None else None
            else:
                ids = seq.token_ids[start:]
                lps = list(seq.logprobs) if params.logprobs is not None else None
            seq.num_tokens_sent = num_output
            completions.append(CompletionOutput(
                index=seq.index, text=text, token_ids=ids,
                cumulative_logprob=seq.cumulative_logprob if params.logprobs is not None else None,
                logprobs=lps, finish_reason=seq.finish_reason, stop_reason=seq.stop_reason))
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, completions, done,
                             request.metrics, request.metrics.num_cached_tokens)
