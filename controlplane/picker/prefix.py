"""Which prompt blocks the picker sent to which endpoint: its guess at each server's cache.

The picker cannot see a server's prefix cache, so, like the Gateway API Inference
Extension's approximate prefix scorer, it remembers the blocks (controlplane/prompt.py) of
the prompts it sent to each endpoint, in an LRU as large as the server's cache. A new
request's blocks are then looked up per endpoint: the longest run of leading blocks found
is how much of its prompt that server should still have.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable


class PrefixIndex:
    def __init__(self, capacity_blocks: int) -> None:
        self.capacity = capacity_blocks
        self._sent: dict[str, OrderedDict[int, None]] = {}

    def matched(self, hashes: list[int], endpoints: Iterable[str]) -> dict[str, int]:
        """How many leading blocks of the prompt each endpoint has.

        A binary search per endpoint: the blocks of a chain are recorded last to first, so
        an endpoint that has block k has every block before it (the LRU drops the later
        ones first), and the lookups are O(log blocks) whatever the prompt's length."""
        result = {}
        for endpoint in endpoints:
            sent = self._sent.get(endpoint)
            low, high = 0, len(hashes) if sent else 0
            while low < high:  # the largest k with hashes[k - 1] sent there
                middle = (low + high + 1) // 2
                if hashes[middle - 1] in sent:
                    low = middle
                else:
                    high = middle - 1
            result[endpoint] = low
        return result

    def record(self, endpoint: str, hashes: list[int]) -> None:
        """The prompt went to `endpoint`: its blocks are that server's most recent."""
        sent = self._sent.get(endpoint)
        if sent is None:
            sent = self._sent[endpoint] = OrderedDict()
        for chained in reversed(hashes):  # the first block last: the most recently used
            if chained in sent:
                sent.move_to_end(chained)
            else:
                sent[chained] = None
        while len(sent) > self.capacity:
            sent.popitem(last=False)

    def forget(self, endpoint: str) -> None:
        """A server that restarted or left has an empty cache."""
        self._sent.pop(endpoint, None)

    def blocks(self, endpoint: str) -> int:
        return len(self._sent.get(endpoint, ()))
