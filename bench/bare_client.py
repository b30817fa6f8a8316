"""The reference client for bench/throughput.py: the least code that does the same job as
`batchtts run` without a ledger — aiohttp, asyncio, a semaphore, one file written per row.

    python bench/bare_client.py URL MANIFEST.parquet OUT_DIR CONCURRENCY
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import aiohttp
import pyarrow.parquet as pq


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
                                (out / f"{row_id}.pcm").write_bytes(body)
                                return
                    except aiohttp.ClientError:
                        pass

        await asyncio.gather(*(one(i, t) for i, t in zip(table["id"].to_pylist(), table["text"].to_pylist(), strict=True)))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])))
