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

:class:`TopicIndex` finds every subscription that matches a topic:

* plain subscriptions sit in a dict, so a message to a plain topic costs one lookup
  whatever their number;
* pattern subscriptions are grouped by their literal prefix (the text before the first
  ``*``, ``?`` or ``[``). Only a pattern whose prefix is a prefix of ``t`` can match
  ``t``, so a lookup tries one dict probe per distinct prefix length and runs the
  pattern only for the few candidates found;
* a message sent to a pattern ``t`` additionally scans the sorted topics that start
  with ``t``'s literal prefix (rebuilt lazily after subscriptions change).
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Hashable, Iterator
from fnmatch import fnmatchcase, translate
from typing import Generic, TypeVar

__all__ = ['validate_topic', 'is_pattern', 'literal_prefix', 'matches', 'TopicIndex']

_MAGIC = re.compile(r'[*?\[]')

Item = TypeVar('Item', bound=Hashable)


def validate_topic(topic: object, what: str = 'topic') -> str:
    """Return *topic* if it is a non-empty ``str``; raise ``TypeError``/``ValueError`` if not."""
    if type(topic) is not str:
        if not isinstance(topic, str):
            raise TypeError(f'{what} must be a non-empty str, got {type(topic).__name__} '
                            f'{topic!r}')
        topic = str(topic)
    if not topic:
        raise ValueError(f"{what} must be a non-empty str, got ''")
    if not topic.isascii():
        try:
            topic.encode()
        except UnicodeEncodeError as exc:
            raise ValueError(f'{what} must be encodable as UTF-8, got {topic!r}: {exc}'
                             ) from None
    return topic


def is_pattern(topic: str) -> bool:
    """True if *topic* contains a wildcard character (``*``, ``?`` or ``[``)."""
    return '*' in topic or '?' in topic or '[' in topic


def literal_prefix(topic: str) -> str:
    """The text of *topic* before its first wildcard character (all of it if none)."""
    found = _MAGIC.search(topic)
    return topic if found is None else topic[:found.start()]


def matches(subscription: str, topic: str) -> bool:
    """The matching rule: does a subscription to *subscription* receive a message to *topic*?"""
    return subscription == topic or fnmatchcase(topic, subscription) \
        or fnmatchcase(subscription, topic)


def _compile(pattern: str) -> Callable[[str], object]:
    return re.compile(translate(pattern)).match


class TopicIndex(Generic[Item]):
    """Subscriptions (topic -> items) with lookups that do not test every subscription.

    Writers (``add``, ``remove``) must be serialized by the owner; lookups need no lock
    and may run while a writer changes the index (under the GIL each lookup reads
    snapshots taken by single C-level operations). Items are any hashable objects
    (channels in an app process, connections in the broker); an item is stored once per
    topic, in the order added.
    """

    __slots__ = ('_plain', '_patterns', '_by_prefix', '_prefix_lengths',
                 '_length_counts', '_sorted', '_version')

    def __init__(self) -> None:
        self._plain: dict[str, dict[Item, None]] = {}
        self._patterns: dict[str, dict[Item, None]] = {}
        # literal prefix -> {pattern: compiled match}
        self._by_prefix: dict[str, dict[str, Callable[[str], object]]] = {}
        self._length_counts: dict[int, int] = {}
        self._prefix_lengths: tuple[int, ...] = ()
        # (version, sorted topics): valid only while _version is unchanged; a lookup may
        # store it while a writer changes the index, so it carries the version it saw
        self._sorted: tuple[int, list[str]] = (-1, [])
        self._version = 0

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
        table[topic] = {item: None}
        self._version += 1
        if table is self._patterns:
            prefix = literal_prefix(topic)
            self._by_prefix.setdefault(prefix, {})[topic] = _compile(topic)
            count = self._length_counts.get(len(prefix), 0)
            self._length_counts[len(prefix)] = count + 1
            if not count:
                self._prefix_lengths = tuple(sorted(self._length_counts))
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
        self._version += 1
        if pattern:
            prefix = literal_prefix(topic)
            bucket = self._by_prefix[prefix]
            del bucket[topic]
            if not bucket:
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
        for _, entry in self._matching(topic):
            found.update(entry)
        return found

    def _matching(self, topic: str) -> Iterator[tuple[str, dict[Item, None]]]:
        entry = self._plain.get(topic)
        if entry is not None:
            yield topic, entry
        lengths = self._prefix_lengths
        if lengths:
            by_prefix, patterns = self._by_prefix, self._patterns
            size = len(topic)
            for length in lengths:
                if length > size:
                    break
                bucket = by_prefix.get(topic[:length])
                if bucket:
                    for pattern, match in tuple(bucket.items()):
                        if pattern == topic or match(topic):
                            entry = patterns.get(pattern)
                            if entry is not None:
                                yield pattern, entry
        if is_pattern(topic):
            yield from self._matching_sent_pattern(topic)

    def _matching_sent_pattern(self, topic: str) -> Iterator[tuple[str, dict[Item, None]]]:
        # Topics that the sender's pattern matches and that the lookups above missed:
        # they start with its literal prefix, so scan that range of the sorted topics.
        version, ordered = self._sorted
        if version != self._version:
            version = self._version
            ordered = sorted(list(self._plain) + list(self._patterns))
            self._sorted = (version, ordered)
        prefix = literal_prefix(topic)
        match = _compile(topic)
        for i in range(bisect.bisect_left(ordered, prefix), len(ordered)):
            candidate = ordered[i]
            if not candidate.startswith(prefix):
                break
            if candidate == topic or not match(candidate):
                continue
            entry = self._patterns.get(candidate)
            if entry is not None:
                # a pattern that matches the sent topic as a string was yielded already
                if not fnmatchcase(topic, candidate):
                    yield candidate, entry
            else:
                entry = self._plain.get(candidate)
                if entry is not None:
                    yield candidate, entry
