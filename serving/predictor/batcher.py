"""Single-digit requests from REST and gRPC gathered into batches, as TorchServe's frontend batches them.

KServe's Python server calls the model once per request; one forward pass per digit would pay the
model's fixed cost per request. Here requests queue; one task takes every request already waiting
(up to `max_batch`), waits at most `max_delay` seconds for more, and runs the batch on one thread
while the event loop goes on decoding the next requests. With `max_delay` 0 a lone request is never
held back, and under load the batch is whatever arrived while the previous one ran.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Sequence
from typing import Any


class MicroBatcher:
    def __init__(self, run: Callable[[list[Any]], Sequence[Any]], max_batch: int = 32, max_delay: float = 0.0):
        self.run, self.max_batch, self.max_delay = run, max_batch, max_delay
        self.queue: asyncio.Queue[tuple[Any, asyncio.Future]] = asyncio.Queue()
        self.task: asyncio.Task | None = None
        # One thread: batches run one after another, each with all of torch's intra-op threads.
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="batch")
        self.sizes: list[int] = []  # batch sizes, for the measurement's record

    async def submit(self, item: Any) -> Any:
        """The answer for one item, computed in some batch."""
        if self.task is None:  # started on the server's own event loop, at the first request
            self.task = asyncio.get_running_loop().create_task(self._serve())
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((item, future))
        return await future

    async def _next_batch(self) -> list[tuple[Any, asyncio.Future]]:
        batch = [await self.queue.get()]
        deadline = asyncio.get_running_loop().time() + self.max_delay
        while len(batch) < self.max_batch:
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), left))
            except TimeoutError:
                break
        return batch

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            live = [(item, future) for item, future in batch if not future.cancelled()]  # client gone
            if not live:
                continue
            self.sizes.append(len(live))
            try:
                results = await loop.run_in_executor(self.executor, self.run, [item for item, _ in live])
            except Exception as err:  # the batch's requests fail, the batcher goes on
                for _, future in live:
                    if not future.done():
                        future.set_exception(err)
                continue
            for (_, future), result in zip(live, results, strict=True):
                if not future.done():
                    future.set_result(result)
