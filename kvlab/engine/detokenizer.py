"""Incremental detokenization: the text a stream of token ids adds, one step at a time.

Decoding each new token on its own is wrong twice over. A byte-level BPE token can hold
part of a UTF-8 character (an emoji or a CJK character often spans two or three
tokens): alone it decodes to U+FFFD, "�". And SentencePiece tokenizers drop a token's
leading space when it starts the decoded text. Decoding the whole output every step is
right but costs O(length) per token. So, as vLLM and Hugging Face's TextStreamer do,
decode a short window twice:

    prefix = decode(ids[prefix_offset:read_offset])   # text already handed out
    full   = decode(ids[prefix_offset:])              # the same, plus the new tokens
    delta  = full[len(prefix):]                       # unless it ends in an incomplete character

and slide the window forward once the new text is complete. The window starts on the
last few prompt tokens, so the first output token decodes in context.

This runs for every running sequence at every step, so it calls the Rust tokenizer
(`backend_tokenizer.decode`) directly where that gives the same text as transformers'
`decode` (no clean-up of spaces to apply): the Python wrapper costs four times the decode.
"""

from __future__ import annotations

CONTEXT_TOKENS = 5          # prompt tokens the window starts on (vLLM uses the same number)
INCOMPLETE = "\ufffd"       # what a partial UTF-8 sequence decodes to


def decoder(tokenizer, skip_special_tokens: bool):
    """ids -> text, equal to tokenizer.decode(ids, skip_special_tokens=...), as cheaply as possible."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and getattr(tokenizer, "clean_up_tokenization_spaces", True) is False:
        return lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.decode = decoder(tokenizer, skip_special_tokens)
        self.ids = list(prompt_token_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def add(self, token_ids: list[int], final: bool = False) -> str:
        """Append new token ids; return the text they complete. final=True flushes what is left
        (an incomplete character at the very end comes out as U+FFFD, as a full decode gives)."""
        self.ids.extend(token_ids)
        decode = self.decode
        prefix = decode(self.ids[self.prefix_offset:self.read_offset])
        full = decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and (final or not full.endswith(INCOMPLETE)):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix):]
        return ""
