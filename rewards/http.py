"""Scores from an external reward server (Flow-GRPO's reward-server wire format).

Options: url (REWARD_SERVER_URL), timeout_s 60, retries 3, backoff_s 1, wire "pickle" | "json",
jpeg_quality 95.

Wire format (github.com/yifan123/reward-server, app_geneval.py): one POST per call to `url`, body =
pickle (or JSON with wire="json") of
  {"images": [JPEG bytes (base64 text in JSON)], "prompts": [...], "meta_datas": [...], "only_strict": False}
answered with a pickled (JSON) dict holding "scores" (GenEval server) or "outputs" (DeQA/UnifiedReward
servers) as a list of B numbers; every other list of B numbers is returned in info under its own key
(Flow-GRPO's GenEval server: scores = partial credit, info["rewards"] = GenEval accuracy,
info["strict_rewards"] = its exact-count accuracy). HTTP 5xx and connection errors are retried
`retries` times with exponential backoff. Unpickle only the answers of servers you trust; wire="json"
avoids pickle on both sides.
"""
from __future__ import annotations

import base64
import json
import numbers
import pickle
import socket
import time
import urllib.error
import urllib.parse
import urllib.request

from rewards.registry import as_scores, jpeg_bytes, pil_images, register, setting

def check_reachable(url: str, timeout_s: float = 5.0) -> None:
    """The reward server's host and port accept a connection (checked when the reward is built, before
    any model loads); else a ValueError in one line."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"http reward: {url!r} is not an http(s) URL, e.g. http://127.0.0.1:18085")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=min(timeout_s, 5.0)).close()
    except OSError as e:
        raise ValueError(f"http reward: the reward server {url} is not reachable ({e.strerror or e}); "
                         "start it, or point url= / REWARD_SERVER_URL at it") from None


def _check_http(url=None, timeout_s=60.0):
    url = setting(url, "REWARD_SERVER_URL")
    if not url:
        raise ValueError("http reward needs url=... or REWARD_SERVER_URL, e.g. http://127.0.0.1:18085")
    check_reachable(url, timeout_s)
    return [f"reward server {url}: reachable"]


@register("http", check=lambda url=None, timeout_s=60.0, **wire: _check_http(url, timeout_s))
def _http(device, dtype, url=None, timeout_s=60.0, retries=3, backoff_s=1.0, wire="pickle", jpeg_quality=95):
    url = setting(url, "REWARD_SERVER_URL")
    if not url:
        raise ValueError("http reward needs url=... or REWARD_SERVER_URL, e.g. http://127.0.0.1:18085")
    if wire not in ("pickle", "json"):
        raise ValueError(f"http reward: wire must be 'pickle' or 'json', got {wire!r}")
    check_reachable(url, timeout_s)

    def post(body):
        request = urllib.request.Request(url, data=body, method="POST", headers={
            "Content-Type": "application/json" if wire == "json" else "application/octet-stream"})
        for attempt in range(retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=timeout_s) as response:
                    return response.read()
            except urllib.error.HTTPError as error:  # the server answered with an error status
                if error.code < 500 or attempt == retries:
                    raise RuntimeError(f"reward server {url} answered HTTP {error.code}: "
                                       f"{error.read()[:2000].decode(errors='replace')}") from error
            except (urllib.error.URLError, OSError) as error:  # refused, unreachable, timed out
                if attempt == retries:
                    raise RuntimeError(f"reward server {url} unreachable after {retries + 1} attempts "
                                       f"(timeout {timeout_s} s): {error}") from error
            time.sleep(backoff_s * 2 ** attempt)

    def http(images, prompts, metadata):
        jpegs = [jpeg_bytes(pil, jpeg_quality) for pil in pil_images(images, prompts, metadata)]
        payload = {"images": jpegs, "prompts": list(prompts), "meta_datas": list(metadata),
                   "only_strict": False}
        if wire == "json":
            payload["images"] = [base64.b64encode(jpeg).decode() for jpeg in jpegs]
            answer = json.loads(post(json.dumps(payload).encode()))
        else:
            answer = pickle.loads(post(pickle.dumps(payload)))
        score_key = "scores" if isinstance(answer, dict) and "scores" in answer else "outputs"
        if not isinstance(answer, dict) or len(answer.get(score_key, ())) != len(prompts):
            raise RuntimeError(f"reward server {url} must answer a dict with {len(prompts)} 'scores' or "
                               f"'outputs', got {str(answer)[:500]}")
        info = {key: as_scores(value) for key, value in answer.items()
                if key != score_key and isinstance(value, list) and len(value) == len(prompts)
                and all(isinstance(v, numbers.Real) for v in value)}
        return as_scores(answer[score_key]), info
    return http
