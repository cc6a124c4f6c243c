"""Topics: validation, Lona's matching rule, and an index that does not scan.

Matching rules (Lona's, made case-sensitive everywhere): a subscription to ``s``
receives a message sent to ``t`` when

* ``s == t``, or
* ``fnmatchcase(t, s)``: ``s`` is a pattern that matches the string ``t``, or
* ``fnmatchcase(s, t)``: the sender used a pattern ``t`` that matches the string ``s``.

In patterns ``*`` matches any run of characters, dots included; ``?`` matches one
character; ``[abc]`` and ``[!abc]`` match one character of (or not of) a set. A topic
with none of ``*?[`` is a plain topic. Wildcard against wildcard is the same string
test, so ``chat.*`` and ``chat.rooms.*`` match each other.

Patterns are matched by :func:`pattern_matcher`, which gives ``fnmatchcase``'s answers
in bounded time. A pattern of literal text and ``*`` only (most of them) needs no
regular expression: ``startswith``, ``endswith`` and ``find``, linear in the lengths of
topic and pattern. Other patterns are translated in one pass (``fnmatch.translate``
takes time quadratic in the number of ``[``) to a regular expression that never
backtracks into a ``*`` it has placed, so a match costs at most O(len(topic) *
len(pattern)) steps of the regular expression engine, and O(len(topic) + len(pattern))
for most patterns. With topics bounded in length (the ``MAX_TOPIC_LENGTH`` setting,
which the callers pass to :func:`validate_topic`) both are bounded.

:class:`TopicIndex` finds every subscription that matches a topic:

* plain subscriptions sit in a dict, so a message to a plain topic costs one lookup
  whatever their number;
* pattern subscriptions are grouped by their literal prefix (the text before the first
  ``*``, ``?`` or ``[``) and then by their literal suffix (the text after the last
  wildcard). Only a pattern whose prefix starts ``t`` and whose suffix ends it can
  match ``t``, so a lookup tries one dict probe per distinct prefix length (and per
  distinct suffix length of the prefixes found) and runs the pattern only for the
  candidates found;
* a message sent to a pattern ``t`` additionally scans the subscribed topics that start
  with ``t``'s literal prefix: sorted once, when the first such pattern is sent, then
  kept in order as they change (never sorted again); a sent pattern that starts with a
  wildcard scans every topic, unsorted, and one made of ``*`` alone runs no pattern.
"""

from __future__ import annotations

import itertools
import os
import re
import threading
import weakref
from bisect import bisect_left
from collections.abc import Callable, Hashable, Iterable, Iterator
from fnmatch import fnmatchcase, translate
from functools import lru_cache
from operator import itemgetter
from typing import Generic, TypeVar

__all__ = ['validate_topic', 'topic_size', 'is_pattern', 'literal_prefix',
           'literal_suffix', 'matches', 'pattern_matcher', 'TopicIndex']

_MAGIC = re.compile(r'[*?\[]')
_SUFFIX_END = re.compile(r'[*?\[\]][^*?\[\]]*\Z')

Item = TypeVar('Item', bound=Hashable)


def validate_topic(topic: object, what: str = 'topic', max_length: int | None = None
                   ) -> str:
    """Return *topic* if it is a non-empty ``str`` of at most *max_length* UTF-8 bytes
    (no limit if None); raise ``TypeError``/``ValueError`` if not."""
    if type(topic) is not str:
        if not isinstance(topic, str):
            raise TypeError(f'{what} must be a non-empty str, got {type(topic).__name__} '
                            f'{topic!r}')
        topic = str(topic)
    if not topic:
        raise ValueError(f"{what} must be a non-empty str, got ''")
    if topic.isascii():
        size = len(topic)
    else:
        try:
            size = len(topic.encode())
        except UnicodeEncodeError as exc:
            raise ValueError(f'{what} must be encodable as UTF-8, got {topic!r}: {exc}'
                             ) from None
    if max_length is not None and size > max_length:
        raise ValueError(too_long(topic, max_length, what))
    return topic


def too_long(topic: str, max_length: int, what: str = 'topic') -> str:
    """The error message for *topic*, longer than *max_length* UTF-8 bytes."""
    return (f'{what} {topic[:40]!r}... is {topic_size(topic)} bytes long in UTF-8, over '
            f'MAX_TOPIC_LENGTH={max_length}: use a shorter topic, or raise the setting '
            f'(in every process and the broker)')


def topic_size(topic: str) -> int:
    """The length of *topic* in UTF-8 bytes (what ``MAX_TOPIC_LENGTH`` limits)."""
    return len(topic) if topic.isascii() else len(topic.encode(errors='surrogatepass'))


def is_pattern(topic: str) -> bool:
    """True if *topic* contains a wildcard character (``*``, ``?`` or ``[``)."""
    return '*' in topic or '?' in topic or '[' in topic


def literal_prefix(topic: str) -> str:
    """The text of *topic* before its first wildcard character (all of it if none)."""
    found = _MAGIC.search(topic)
    return topic if found is None else topic[:found.start()]


def literal_suffix(pattern: str) -> str:
    """The text of *pattern* after its last ``*``, ``?``, ``[`` or ``]``: every string
    that *pattern* matches ends with it (the whole of a plain topic)."""
    found = _SUFFIX_END.search(pattern)
    return pattern if found is None else pattern[found.start() + 1:]


def is_unanchored(topic: str) -> bool:
    """True for a pattern with neither a literal prefix nor a literal suffix (``*x*``,
    ``*``): the index cannot narrow those, so each is tried for every message."""
    return is_pattern(topic) and not literal_prefix(topic) and not literal_suffix(topic)


def is_match_all(topic: str) -> bool:
    """True for a topic made of ``*`` only, which matches every topic."""
    return not topic.strip('*')


def matches(subscription: str, topic: str) -> bool:
    """The matching rule: does a subscription to *subscription* receive a message to *topic*?"""
    return subscription == topic or fnmatchcase(topic, subscription) \
        or fnmatchcase(subscription, topic)


@lru_cache(maxsize=4096)
def _set_regex(text: str) -> str:
    # one whole ``[...]`` set, translated by fnmatch itself so that ranges, ``!`` and
    # escapes mean exactly what they mean to fnmatchcase: '(?s:<set>)\Z' -> '<set>'
    return translate(text)[4:-3]


def _translate(pattern: str) -> str:
    """A regular expression for ``match()`` that matches what ``fnmatchcase`` does, built
    in one pass: literal runs and sets between the stars form fixed-width segments; the
    first is anchored at the start, each middle one is found at its leftmost place in an
    atomic group (never revisited: the leftmost place is always the best one), and a
    last one, after the last star, is tested once against the end of the topic."""
    segments: list[list[str]] = [[]]
    widths = [0]
    i, n = 0, len(pattern)
    no_close = n + 1      # no ']' at or after this index: a '[' from here on is literal
    while i < n:
        found = _MAGIC.search(pattern, i)
        end = n if found is None else found.start()
        if end > i:
            segments[-1].append(re.escape(pattern[i:end]))
            widths[-1] += end - i
        if found is None:
            break
        char, i = pattern[end], end + 1
        if char == '*':
            if len(segments) == 1 or segments[-1]:    # consecutive stars are one
                segments.append([])
                widths.append(0)
            continue
        if char == '?':
            segments[-1].append('.')
        else:    # '[': a set up to the next ']' (one right after '[' or '[!' is in it)
            j = i
            if j < n and pattern[j] == '!':
                j += 1
            if j < n and pattern[j] == ']':
                j += 1
            close = -1 if j >= no_close else pattern.find(']', j)
            if close < 0:
                no_close = min(no_close, j)
                segments[-1].append(r'\[')
            else:
                segments[-1].append(_set_regex(pattern[end:close + 1]))
                i = close + 1
        widths[-1] += 1
    if len(segments) == 1:
        return f'(?s:{"".join(segments[0])})\\Z'
    parts = [''.join(segments[0])]
    parts.extend(f'(?>.*?{"".join(middle)})' for middle in segments[1:-1])
    if segments[-1]:
        # at least its width left, then its width at the very end of the topic
        parts.append(f'(?=.{{{widths[-1]}}})(?>.*)(?<={"".join(segments[-1])})')
    return f'(?s:{"".join(parts)})'    # ends with a star: a match of a prefix will do


def _star_matcher(pattern: str) -> Callable[[str], object]:
    """The matcher of a pattern of literal text and ``*`` only: no regular expression,
    ``str.startswith``, ``endswith`` and ``find`` (linear) from left to right."""
    parts = pattern.split('*')
    first, last = parts[0], parts[-1]
    middles = tuple(part for part in parts[1:-1] if part)
    need = len(first) + len(last) + sum(map(len, middles))

    def match(string: str) -> bool:
        if len(string) < need or not string.startswith(first) \
                or not string.endswith(last):
            return False
        position, end = len(first), len(string) - len(last)
        for middle in middles:
            position = string.find(middle, position, end)
            if position < 0:
                return False
            position += len(middle)
        return True
    return match


@lru_cache(maxsize=4096)
def pattern_matcher(pattern: str) -> Callable[[str], object]:
    """A function of a string, true where ``fnmatchcase(string, pattern)`` is, in time
    bounded by O(len(string) * len(pattern)) (see the module's documentation)."""
    if '*' in pattern and '?' not in pattern and '[' not in pattern:
        return _star_matcher(pattern)
    return re.compile(_translate(pattern)).match


def _match_all(topic: str) -> bool:
    return topic.count('*') == len(topic)


class _Bucket:
    """The patterns of one literal prefix, grouped by their literal suffix."""

    __slots__ = ('by_suffix', 'counts', 'lengths')

    def __init__(self) -> None:
        self.by_suffix: dict[str, dict[str, Callable[[str], object]]] = {}
        self.counts: dict[int, int] = {}      # suffix length -> patterns
        self.lengths: tuple[int, ...] = ()    # the suffix lengths, ascending


_last = itemgetter(-1)


class _SortedTopics:
    """Topics in sorted order, in chunks, for scans of the topics with a given prefix.

    Writers are serialized by the owner; a reader needs no lock, because a chunk is
    never changed once it is in the list (a writer puts a changed copy in its place),
    so a reader sees each chunk whole, before or after a change.
    """

    __slots__ = ('_chunks',)
    _SPLIT = 1024

    def __init__(self, topics: list[str]) -> None:
        # topics: sorted, without duplicates
        half = self._SPLIT // 2
        self._chunks: list[list[str]] = [topics[i:i + half]
                                         for i in range(0, len(topics), half)]

    def add(self, topic: str) -> None:
        """Insert *topic* (a no-op if present)."""
        chunks = self._chunks
        if not chunks:
            self._chunks = [[topic]]
            return
        i = min(bisect_left(chunks, topic, key=_last), len(chunks) - 1)
        chunk = chunks[i]
        j = bisect_left(chunk, topic)
        if j < len(chunk) and chunk[j] == topic:
            return
        chunk = chunk[:]
        chunk.insert(j, topic)
        if len(chunk) > self._SPLIT:
            half = len(chunk) // 2
            self._chunks = chunks[:i] + [chunk[:half], chunk[half:]] + chunks[i + 1:]
        else:
            chunks[i] = chunk

    def remove(self, topic: str) -> None:
        """Remove *topic* (a no-op if absent)."""
        chunks = self._chunks
        i = bisect_left(chunks, topic, key=_last)
        if i == len(chunks):
            return
        chunk = chunks[i]
        j = bisect_left(chunk, topic)
        if j == len(chunk) or chunk[j] != topic:
            return
        if len(chunk) == 1:
            self._chunks = chunks[:i] + chunks[i + 1:]
        else:
            chunks[i] = chunk[:j] + chunk[j + 1:]

    def starting_with(self, prefix: str) -> Iterator[str]:
        """The topics that start with *prefix*, in order."""
        chunks = self._chunks
        if not prefix:
            for chunk in chunks:
                yield from chunk
            return
        i = bisect_left(chunks, prefix, key=_last)
        if i == len(chunks):
            return
        chunk = chunks[i]
        start = bisect_left(chunk, prefix)
        while True:
            for position in range(start, len(chunk)):
                topic = chunk[position]
                if not topic.startswith(prefix):
                    return
                yield topic
            i += 1
            if i == len(chunks):
                return
            chunk, start = chunks[i], 0


_indexes: weakref.WeakSet[TopicIndex] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for index in list(_indexes):
        index._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


class TopicIndex(Generic[Item]):
    """Subscriptions (topic -> items) with lookups that do not test every subscription.

    Writers (``add``, ``remove``) must be serialized by the owner; lookups need no lock
    and may run while a writer changes the index (under the GIL each lookup reads
    snapshots taken by single C-level operations). Items are any hashable objects
    (channels in an app process, connections in the broker); an item is stored once per
    topic, in the order added.
    """

    __slots__ = ('_plain', '_patterns', '_by_prefix', '_prefix_lengths',
                 '_length_counts', '_sorted', '_sorted_wanted', '_sorted_lock',
                 '__weakref__')

    def __init__(self) -> None:
        self._plain: dict[str, dict[Item, None]] = {}
        self._patterns: dict[str, dict[Item, None]] = {}
        self._by_prefix: dict[str, _Bucket] = {}
        self._length_counts: dict[int, int] = {}     # prefix length -> patterns
        self._prefix_lengths: tuple[int, ...] = ()
        # every topic in order, for patterns sent with a literal prefix: built by the
        # first lookup that wants it, then kept by the writers. A writer changes the
        # dicts first and then, if it is wanted, the sorted topics under the lock, so a
        # lookup that builds them under the lock misses no change.
        self._sorted: _SortedTopics | None = None
        self._sorted_wanted = False
        self._sorted_lock = threading.Lock()
        _indexes.add(self)

    def __len__(self) -> int:
        """The number of distinct topics subscribed."""
        return len(self._plain) + len(self._patterns)

    def __contains__(self, topic: object) -> bool:
        return topic in self._plain or topic in self._patterns

    def __repr__(self) -> str:
        return (f'<TopicIndex plain={len(self._plain)} patterns={len(self._patterns)} '
                f'prefix_lengths={len(self._prefix_lengths)}>')

    def topics(self) -> list[str]:
        """Every subscribed topic (a snapshot)."""
        return list(self._plain) + list(self._patterns)

    def items(self, topic: str) -> list[Item]:
        """The items subscribed to exactly *topic*."""
        entry = self._plain.get(topic) or self._patterns.get(topic)
        return list(entry) if entry else []

    def add(self, topic: str, item: Item) -> bool:
        """Subscribe *item* to *topic*; True if *topic* had no item before."""
        table = self._patterns if is_pattern(topic) else self._plain
        entry = table.get(topic)
        if entry is not None:
            entry[item] = None
            return False
        if table is self._patterns:
            matcher = pattern_matcher(topic)      # before any change: it may raise
            prefix, suffix = literal_prefix(topic), literal_suffix(topic)
            bucket = self._by_prefix.get(prefix)
            if bucket is None:
                bucket = self._by_prefix[prefix] = _Bucket()
            group = bucket.by_suffix.get(suffix)
            if group is None:
                group = bucket.by_suffix[suffix] = {}
            group[topic] = matcher
            count = bucket.counts.get(len(suffix), 0)
            bucket.counts[len(suffix)] = count + 1
            if not count:
                bucket.lengths = tuple(sorted(bucket.counts))
            count = self._length_counts.get(len(prefix), 0)
            self._length_counts[len(prefix)] = count + 1
            if not count:
                self._prefix_lengths = tuple(sorted(self._length_counts))
        table[topic] = {item: None}
        if self._sorted_wanted:
            with self._sorted_lock:
                if self._sorted is not None:
                    self._sorted.add(topic)
        return True

    def remove(self, topic: str, item: Item) -> bool:
        """Unsubscribe *item* from *topic*; True if *topic* has no item left. Absent: no-op."""
        pattern = topic in self._patterns
        table = self._patterns if pattern else self._plain
        entry = table.get(topic)
        if entry is None or item not in entry:
            return False
        del entry[item]
        if entry:
            return False
        del table[topic]
        if self._sorted_wanted:
            with self._sorted_lock:
                if self._sorted is not None:
                    self._sorted.remove(topic)
        if pattern:
            prefix, suffix = literal_prefix(topic), literal_suffix(topic)
            bucket = self._by_prefix[prefix]
            group = bucket.by_suffix[suffix]
            del group[topic]
            if not group:
                del bucket.by_suffix[suffix]
            count = bucket.counts[len(suffix)] - 1
            if count:
                bucket.counts[len(suffix)] = count
            else:
                del bucket.counts[len(suffix)]
                bucket.lengths = tuple(sorted(bucket.counts))
            if not bucket.by_suffix:
                del self._by_prefix[prefix]
            count = self._length_counts[len(prefix)] - 1
            if count:
                self._length_counts[len(prefix)] = count
            else:
                del self._length_counts[len(prefix)]
                self._prefix_lengths = tuple(sorted(self._length_counts))
        return True

    def match(self, topic: str) -> list[Item]:
        """Every item subscribed to a topic that matches *topic*, each once."""
        if not self._prefix_lengths:
            entry = self._plain.get(topic)   # the common case: one dict lookup
            if entry is not None:            # (equal to a plain topic: not a pattern)
                return list(entry)
            if '*' not in topic and '?' not in topic and '[' not in topic:
                return []
        return list(self._match_entries(topic))

    def _match_entries(self, topic: str) -> dict[Item, None]:
        found: dict[Item, None] = {}
        for entry in self._matching(topic):
            found.update(entry)
        return found

    def _matching(self, topic: str) -> Iterator[dict[Item, None]]:
        # the entries of the matching topics; one may come more than once
        entry = self._plain.get(topic)
        if entry is not None:
            yield entry
        lengths = self._prefix_lengths
        if lengths:
            by_prefix, patterns = self._by_prefix, self._patterns
            size = len(topic)
            for length in lengths:
                if length > size:
                    break
                bucket = by_prefix.get(topic[:length])
                if bucket is None:
                    continue
                left = size - length          # prefix and suffix do not overlap
                for suffix_length in bucket.lengths:
                    if suffix_length > left:
                        break
                    group = bucket.by_suffix.get(topic[size - suffix_length:])
                    if group:
                        for pattern, match in tuple(group.items()):
                            if pattern == topic or match(topic):
                                entry = patterns.get(pattern)
                                if entry is not None:
                                    yield entry
        if '*' in topic or '?' in topic or '[' in topic:
            yield from self._matching_sent_pattern(topic)

    def _sorted_topics(self) -> _SortedTopics:
        # once per index, when a pattern with a literal prefix is first sent
        self._sorted_wanted = True          # from here on writers keep them (see above)
        with self._sorted_lock:
            if self._sorted is None:
                self._sorted = _SortedTopics(sorted(self.topics()))
            return self._sorted

    def _after_fork_in_child(self) -> None:
        self._sorted_lock = threading.Lock()    # a parent's thread may have held it

    def _matching_sent_pattern(self, topic: str) -> Iterator[dict[Item, None]]:
        # Topics that the sender's pattern matches as strings: they start with its
        # literal prefix, so scan that range of the sorted topics (or, until a writer
        # has built them, every topic); nothing is sorted here.
        plain, patterns = self._plain, self._patterns
        match = None if _match_all(topic) else pattern_matcher(topic)
        prefix = literal_prefix(topic)
        ordered = self._sorted
        candidates: Iterable[str]
        if ordered is None and prefix:
            ordered = self._sorted_topics()
        if ordered is not None:
            candidates = ordered.starting_with(prefix)
        else:      # '*...': every topic is a candidate, in any order
            candidates = itertools.chain(list(plain), list(patterns))
        for candidate in candidates:
            if match is None or match(candidate):
                entry = plain.get(candidate)
                if entry is None:
                    entry = patterns.get(candidate)
                if entry is not None:
                    yield entry
