"""The KV page pool: free list, reference counts and prefix caching by page hash.

A page holds `page_size` consecutive tokens of one sequence in every layer's
cache. Full pages are named by a hash chained over the tokens of all pages
before them, so two sequences that share a prefix share its pages. A page whose
last user leaves keeps its contents and hash, waiting in an LRU list; it is
reused by a matching prefix, or recycled (hash dropped) when the free list is
empty.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Callable, Sequence

PageKey = tuple[int, tuple]  # (hash of the previous page's key, this page's tokens and tags)
# Page index -> tags that the page's KV depends on beyond its tokens (the hashes of the images
# whose placeholders it holds), appended to its key; () for a text page.
PageTags = Callable[[int], tuple]


def next_page_key(previous: PageKey | None, page_tokens: Sequence[int], salt: int = 0, tags: tuple = ()) -> PageKey:
    """Key of a full page given the key of the page before it (None for the first, which carries
    `salt`: what else than the tokens decides the page's contents, such as a LoRA adapter). `tags`: the
    hashes of the multimodal items whose placeholders the page holds."""
    return (salt if previous is None else hash(previous), tuple(page_tokens) + tags)


def page_keys(tokens: Sequence[int], page_size: int, num_pages: int, salt: int = 0,
              tags: PageTags | None = None) -> list[PageKey]:
    """Chained keys of the first `num_pages` full pages of `tokens`."""
    keys: list[PageKey] = []
    for i in range(num_pages):
        extra = tags(i) if tags is not None else ()
        keys.append(next_page_key(keys[-1] if keys else None, tokens[i * page_size : (i + 1) * page_size], salt, extra))
    return keys


class PagePool:
    def __init__(self, num_pages: int, page_size: int, *, enable_prefix_caching: bool = True):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"need at least one page of at least one token, got {num_pages} x {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self._free: deque[int] = deque(range(num_pages))
        self._refs = [0] * num_pages
        self._key_of: dict[int, PageKey] = {}  # page -> key, for full cached pages
        self._page_of: dict[PageKey, int] = {}  # key -> page
        self._evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced cached pages, LRU first
        self.prefix_queries = 0  # tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens found

    # -- capacity -------------------------------------------------------------
    def num_free(self) -> int:
        """Pages that an allocation can take now (free or evictable)."""
        return len(self._free) + len(self._evictable)

    def usage(self) -> float:
        """Fraction of pages held by running sequences."""
        return 1.0 - self.num_free() / self.num_pages

    def all_free(self) -> bool:
        return self.num_free() == self.num_pages and not any(self._refs)

    # -- allocation -----------------------------------------------------------
    def allocate(self, count: int) -> list[int]:
        if count > self.num_free():
            raise MemoryError(f"asked for {count} KV pages, {self.num_free()} free")
        pages = []
        for _ in range(count):
            if self._free:
                page = self._free.popleft()
            else:
                page, _ = self._evictable.popitem(last=False)
                del self._page_of[self._key_of.pop(page)]
            self._refs[page] = 1
            pages.append(page)
        return pages

    def release(self, pages: Sequence[int]) -> None:
        """Drop one reference to each page; cached pages wait in the LRU, others go free."""
        for page in reversed(pages):  # tail pages first, so prefixes stay cached longest
            self._refs[page] -= 1
            if self._refs[page] < 0:
                raise RuntimeError(f"KV page {page} released more often than taken")
            if self._refs[page] == 0:
                if page in self._key_of:
                    self._evictable[page] = None
                else:
                    self._free.append(page)

    # -- prefix caching -------------------------------------------------------
    def match_prefix(
        self, tokens: Sequence[int], max_tokens: int, salt: int = 0, tags: PageTags | None = None
    ) -> tuple[list[int], list[PageKey]]:
        """Take the cached pages holding the longest prefix of `tokens` (at most `max_tokens`).

        Returns the pages (each now referenced once more) and their keys. `tags`: see `PageTags`.
        """
        if not self.enable_prefix_caching:
            return [], []
        pages, keys = [], []
        wanted = max_tokens // self.page_size
        for key in page_keys(tokens, self.page_size, wanted, salt, tags):
            page = self._page_of.get(key)
            if page is None:
                break
            if self._refs[page] == 0:
                del self._evictable[page]
            self._refs[page] += 1
            pages.append(page)
            keys.append(key)
        self.prefix_queries += wanted * self.page_size
        self.prefix_hits += len(pages) * self.page_size
        return pages, keys

    def return_matched(self, pages: Sequence[int]) -> None:
        """Give back the tail of a `match_prefix` result that the caller does not use (no longer hits)."""
        self.release(pages)
        self.prefix_hits -= len(pages) * self.page_size

    def register(self, page: int, key: PageKey) -> None:
        """Name a page whose tokens are all computed, so later prefixes can reuse it."""
        if not self.enable_prefix_caching or page in self._key_of or key in self._page_of:
            return  # an identical page cached already: this copy stays private
        self._key_of[page] = key
        self._page_of[key] = page

    def hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0
