"""Solutions to chapter 08's exercises (notebooks/exercises/08_inference_service.ipynb)."""

from __future__ import annotations

import json


def stream_text(chunks) -> str:
    """The generated text of a server-sent-events stream, from network chunks cut anywhere."""
    buffer, text = b"", []
    for chunk in chunks:
        buffer += chunk                                   # bytes: a chunk may end inside a character or a line
        while b"\n\n" in buffer:                          # a complete event ends with a blank line
            event, buffer = buffer.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    return "".join(text)
                message = json.loads(data)
                if not message["choices"]:                # the usage chunk
                    continue
                choice = message["choices"][0]
                if "delta" in choice:                     # chat: the new text is delta.content (may be absent)
                    text.append(choice["delta"].get("content") or "")
                else:                                     # completions
                    text.append(choice["text"])
    return "".join(text)


def stream_latencies(start: float, lines) -> tuple[float, list[float]]:
    """TTFT and one inter-token latency per token after the first event's, from (arrival time, line) pairs."""
    ttft, itls, last = None, [], None
    for t, line in lines:
        if not line.startswith(b"data: "):
            continue                                      # the blank line between events
        data = line[6:].strip()
        if data == b"[DONE]":
            break
        message = json.loads(data)
        if not message["choices"]:
            continue                                      # the usage chunk: no token
        k = len(message["choices"][0].get("token_ids") or ())
        if k == 0:
            continue
        if ttft is None:
            ttft = t - start                              # the first event with tokens
        else:
            itls += [(t - last) / k] * k                  # k tokens arrived together: split the gap
        last = t
    return ttft, itls
