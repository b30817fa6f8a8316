"""The reference client for bench/throughput.py: the least code that does the same job as
`batchtts run` without a ledger — aiohttp, asyncio, a semaphore, and one file per row written the
way any careful script must so that a crash never leaves a truncated file under a final name
(temporary file, fsync in a thread, rename).

    python bench/bare_client.py URL MANIFEST.parquet OUT_DIR CONCURRENCY
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import aiohttp
import pyarrow.parquet as pq


def write_atomically(path: Path, body: bytes) -> None:
    partial = path.with_suffix(".partial")
    with open(partial, "wb") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


async def main(url: str, manifest: str, out: Path, concurrency: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table = pq.read_table(manifest)
    semaphore = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers={"Authorization": "Bearer bench"}) as session:

        async def one(row_id: str, text: str) -> None:
            async with semaphore:
                for _ in range(6):
                    try:
                        async with session.post(f"{url}/audio/speech", json={
                            "model": "openai/gpt-4o-mini-tts", "input": text, "voice": "alloy", "response_format": "pcm",
                        }) as response:
                            body = await response.read()
                            if response.status == 200:
                                await asyncio.to_thread(write_atomically, out / f"{row_id}.pcm", body)
                                return
                    except aiohttp.ClientError:
                        pass

        await asyncio.gather(*(one(i, t) for i, t in zip(table["id"].to_pylist(), table["text"].to_pylist(), strict=True)))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])))
