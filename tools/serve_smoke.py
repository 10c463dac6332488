"""Starts `corral serve` (the corral on PATH, e.g. an installed wheel), asks it for one chat
completion, one json_schema reply and one forced tool call, then stops it with SIGTERM, which
must exit 0. CI runs it against the repaired wheel in a fresh venv: the server's dependencies
must come with a plain install.

    python tools/serve_smoke.py
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as reply:
        return json.load(reply)


def main() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    corral = shutil.which("corral") or sys.exit("corral is not on PATH")
    server = subprocess.Popen([corral, "serve", "--port", str(port), "--quiet"])
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(base + "/health", timeout=5):
                    break
            except OSError:
                if server.poll() is not None:
                    sys.exit(f"corral serve exited with {server.returncode}")
                time.sleep(0.1)
        question = [{"role": "user", "content": "What does the file object do?"}]
        reply = post(base + "/v1/chat/completions", {"messages": question, "max_tokens": 16, "temperature": 0})
        print("chat:", json.dumps(reply["choices"][0]["message"]["content"]))
        schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 30}}, "required": ["answer"]}
        reply = post(base + "/v1/chat/completions", {"messages": question, "max_tokens": 60, "response_format": {
            "type": "json_schema", "json_schema": {"name": "a", "schema": schema}}})
        content = json.loads(reply["choices"][0]["message"]["content"])
        assert isinstance(content.get("answer"), str), content
        print("json_schema:", content)
        tool = {"type": "function", "function": {"name": "lookup", "parameters": {
            "type": "object", "properties": {"name": {"type": "string", "maxLength": 20}}, "required": ["name"]}}}
        reply = post(base + "/v1/chat/completions", {"messages": question, "max_tokens": 60, "tools": [tool],
                                                     "tool_choice": "required"})
        choice = reply["choices"][0]
        assert choice["finish_reason"] == "tool_calls", choice
        call = choice["message"]["tool_calls"][0]["function"]
        assert call["name"] == "lookup" and isinstance(json.loads(call["arguments"])["name"], str), call
        print("tool call:", call)
    finally:
        server.send_signal(signal.SIGTERM)
        status = server.wait(timeout=60)
    print("corral serve exited with", status)
    return status


if __name__ == "__main__":
    sys.exit(main())
