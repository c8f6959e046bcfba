"""A chat over wss with Python's `websockets` (Debian's python3-websockets), trusting only the
test CA: joins, says `hello world`, and waits for the server to broadcast it back.

Usage: wss_echo.py URL CA_FILE. Prints `ok` and exits 0, or says what went wrong and exits 1.
Every wait is bounded (WAIT seconds), so it never hangs a test.
"""

import asyncio
import json
import ssl
import sys

import websockets

WAIT = 5


async def chat(url: str, ca_file: str) -> None:
    context = ssl.create_default_context(cafile=ca_file)
    async with websockets.connect(url, ssl=context, open_timeout=WAIT) as ws:
        welcome = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
        assert welcome["type"] == "welcome", welcome
        await ws.send("hello world")
        while True:
            frame = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
            if frame["type"] == "message":
                assert frame["text"] == "hello world", frame
                return


def main() -> int:
    url, ca_file = sys.argv[1], sys.argv[2]
    try:
        asyncio.run(chat(url, ca_file))
    except Exception as e:  # the test prints it
        print(f"failed: {e!r}")
        return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
