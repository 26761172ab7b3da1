"""What the registry's periodic services (sweeper, reconciler) share."""
from __future__ import annotations

import asyncio


async def pause(stopping: asyncio.Event, seconds: float) -> bool:
    """Sleep `seconds`; False (at once) when `stopping` is set meanwhile."""
    try:
        await asyncio.wait_for(stopping.wait(), seconds)
    except TimeoutError:
        return True
    return False
