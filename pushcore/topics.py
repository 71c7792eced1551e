"""MQTT topic names, topic filters and subscription matching (sans-IO).

The rules are MQTT 5.0 §4.7 (identical in substance to 3.1.1 §4.7) and, for
``$share/{ShareName}/{filter}``, MQTT 5.0 §4.8.2.  The broker (subscriptions,
retained messages, deny lists) and the delivery routes both build on this
module.

- ``validate_filter(filter)`` / ``parse_shared(filter)``: a topic filter from a
  SUBSCRIBE, an UNSUBSCRIBE or the configuration; raise TopicFilterInvalid
  (0x8F).  ``parse_shared`` also splits a shared subscription into its
  ShareName and the topic filter that is matched.
- ``validate_topic(topic)``: a topic name that did not come through the MQTT
  parser (config, HTTP); raise TopicNameInvalid (0x90).  PUBLISH and Will
  topics are already checked by ``pushcore._frame`` while parsing.
- ``matches(filter, topic)``: one filter against one topic name.
- ``SubscriptionTrie``: many filters against one topic name, walking only the
  trie branches the topic's levels can reach.

Matching compares code points exactly: MQTT 5.0 §4.7.3 [MQTT-4.7.3-4] forbids
any normalization of topic names or filters, and topics are case sensitive.
``matches`` and ``SubscriptionTrie.match`` sit on the delivery path and do not
re-validate: they expect a topic name that passed the parser or
``validate_topic``, and ``matches`` a filter that passed ``validate_filter``
(for a shared subscription, the filter ``parse_shared`` returns).
"""

from .errors import TopicFilterInvalid, TopicNameInvalid

__all__ = [
    "SubscriptionTrie",
    "matches",
    "parse_shared",
    "validate_filter",
    "validate_topic",
]

# MQTT 5.0 §4.7.3 [MQTT-4.7.3-3] (3.1.1 the same): topic names and filters are
# UTF-8 Encoded Strings, at most 65,535 bytes (§1.5.4: a two-byte length).
MAX_TOPIC_BYTES = 65535

# MQTT 5.0 §4.8.2: a Shared Subscription's Topic Filter is
# "$share/{ShareName}/{filter}".
SHARE_PREFIX = "$share"

# 3.1.1 and 5.0 §4.7.1.1: the topic level separator.  Adjacent separators make
# a zero-length level, which is still a level: "a//b" has three.
SEPARATOR = "/"
# §4.7.1.3: the single-level wildcard.
SINGLE = "+"
# §4.7.1.2: the multi-level wildcard.
MULTI = "#"
_WILDCARDS = (SINGLE, MULTI)


def _show(text):
    """``text`` for an error message: quoted, and cut short if long."""
    if len(text) > 64:
        return repr(text[:60]) + f"... ({len(text)} characters)"
    return repr(text)


def _check_string(text, error, what):
    """The rules topic names and topic filters share (MQTT 5.0 §4.7.3, §1.5.4)."""
    # §4.7.3 [MQTT-4.7.3-1]: at least one character long.
    if not text:
        raise error(f"{what} is empty")
    # §4.7.3 [MQTT-4.7.3-2] and §1.5.4 [MQTT-1.5.4-2]: no U+0000.
    if "\x00" in text:
        raise error(f"{what} {_show(text)} contains U+0000")
    if text.isascii():
        size = len(text)
    else:
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError:
            # §1.5.4 [MQTT-1.5.4-1]: well-formed UTF-8, no U+D800..U+DFFF.  A
            # Python str from YAML or HTTP can hold a lone surrogate.
            raise error(f"{what} {_show(text)} holds a lone surrogate, "
                        "which UTF-8 cannot encode") from None
    # §4.7.3 [MQTT-4.7.3-3]
    if size > MAX_TOPIC_BYTES:
        raise error(f"{what} is {size} bytes in UTF-8, more than {MAX_TOPIC_BYTES}")


def _check_wildcards(topic_filter):
    """The wildcard placement rules of MQTT 5.0 §4.7.1.2 and §4.7.1.3."""
    if SINGLE not in topic_filter and MULTI not in topic_filter:
        return
    levels = topic_filter.split(SEPARATOR)
    last = len(levels) - 1
    for i, level in enumerate(levels):
        if MULTI in level:
            # 5.0 §4.7.1.2 [MQTT-4.7.1-1] (3.1.1 [MQTT-4.7.1-2]): '#' on its own
            # or after a separator, and the last character of the filter.
            if level != MULTI:
                raise TopicFilterInvalid(
                    f"'#' must be a whole level in topic filter {_show(topic_filter)}")
            if i != last:
                raise TopicFilterInvalid(
                    f"'#' must be the last level of topic filter {_show(topic_filter)}")
        elif SINGLE in level and level != SINGLE:
            # 5.0 §4.7.1.3 [MQTT-4.7.1-2] (3.1.1 [MQTT-4.7.1-3]): '+' occupies
            # an entire level.
            raise TopicFilterInvalid(
                f"'+' must be a whole level in topic filter {_show(topic_filter)}")


def parse_shared(topic_filter):
    """Validate a topic filter and split off a shared subscription's ShareName.

    Returns ``(share_name, filter)``: ``(None, topic_filter)`` for an ordinary
    filter; for ``$share/{ShareName}/{filter}`` the ShareName and the filter
    that topics are matched against.  Raises TopicFilterInvalid (0x8F).

    MQTT 5.0 §4.8.2 defines the shared form by its prefix "$share/".  A filter
    whose first level is ``$share`` but that is not a well-formed shared
    subscription ("$share", "$share/group") is refused rather than taken as an
    ordinary filter, as Mosquitto and EMQX do: a client writing it meant a
    shared subscription, and as an ordinary filter it would silently match
    nothing anyone publishes.  For the same reason, and like EMQX, the filter
    inside may not itself start with ``$share``.  Matching is case sensitive
    (§4.7.3), so "$SHARE/g/x" is an ordinary filter.
    """
    _check_string(topic_filter, TopicFilterInvalid, "topic filter")
    first, _, rest = topic_filter.partition(SEPARATOR)
    if first != SHARE_PREFIX:
        _check_wildcards(topic_filter)
        return None, topic_filter
    share_name, separator, inner = rest.partition(SEPARATOR)
    # §4.8.2 [MQTT-4.8.2-1]: a ShareName at least one character long.
    if not share_name:
        raise TopicFilterInvalid(
            f"shared subscription {_show(topic_filter)} has no ShareName "
            "(the form is $share/{ShareName}/{filter})")
    # §4.8.2 [MQTT-4.8.2-2]: no '/', '+' or '#' in the ShareName ('/' cannot
    # occur: the first '/' after it ends it) ...
    if SINGLE in share_name or MULTI in share_name:
        raise TopicFilterInvalid(
            f"ShareName {_show(share_name)} contains '+' or '#'")
    # ... and it is followed by '/' and a Topic Filter, which §4.7.3
    # [MQTT-4.7.3-1] requires to be at least one character long.
    if not separator or not inner:
        raise TopicFilterInvalid(
            f"shared subscription {_show(topic_filter)} has no topic filter "
            "after its ShareName (the form is $share/{ShareName}/{filter})")
    if inner.partition(SEPARATOR)[0] == SHARE_PREFIX:
        raise TopicFilterInvalid(
            f"shared subscription {_show(topic_filter)} nests another $share")
    _check_wildcards(inner)
    return share_name, inner


def validate_filter(topic_filter):
    """Raise TopicFilterInvalid (0x8F) unless ``topic_filter`` is a valid filter.

    Checks MQTT 5.0 §4.7.1 and §4.7.3 (not empty, no U+0000, at most 65535
    UTF-8 bytes, '#' alone in the last level, '+' alone in its level) and, for
    ``$share/...``, §4.8.2 (see ``parse_shared``).
    """
    parse_shared(topic_filter)


def validate_topic(topic):
    """Raise TopicNameInvalid (0x90) unless ``topic`` is a valid topic name.

    For topic names from the configuration or HTTP; the MQTT parser already
    applies the same rules to PUBLISH and Will topics.  A leading '$' is
    allowed (§4.7.2 reserves such topics for server use but does not forbid
    them); whether a client may publish to one is the broker's decision.
    """
    _check_string(topic, TopicNameInvalid, "topic name")
    # 5.0 §3.3.2.1 [MQTT-3.3.2-2], 3.1.1 §4.7.1 [MQTT-4.7.1-1]: wildcards belong
    # to topic filters, never to a topic name.
    if SINGLE in topic or MULTI in topic:
        raise TopicNameInvalid(f"topic name {_show(topic)} contains a wildcard ('+' or '#')")


def matches(topic_filter, topic):
    """True if the valid filter ``topic_filter`` matches the topic name ``topic``.

    '+' matches exactly one level, possibly empty; '#' matches the level it
    stands in and every level below, and also the parent: "sport/#" matches
    "sport" (§4.7.1.2).  Per §4.7.2 [MQTT-4.7.2-1], a topic name beginning
    with '$' is not matched by a filter beginning with a wildcard.
    """
    if topic_filter.startswith(_WILDCARDS) and topic.startswith("$"):
        return False
    if SINGLE not in topic_filter and MULTI not in topic_filter:
        return topic_filter == topic
    topic_levels = topic.split(SEPARATOR)
    depth = len(topic_levels)
    filter_levels = topic_filter.split(SEPARATOR)
    for i, level in enumerate(filter_levels):
        if level == MULTI:
            # Levels 0..i-1 matched, so the topic has at least i levels.
            return True
        if i >= depth:
            return False
        if level != SINGLE and level != topic_levels[i]:
            return False
    return len(filter_levels) == depth


class _Node:
    """One filter level.

    ``children`` maps a literal level to its node (None until the first
    child); the wildcard levels have their own slots, so a literal lookup
    never meets them.  ``values`` holds the subscriptions whose filter ends
    here, in insertion order (dict keys), and ``topic_filter`` that filter.
    """

    __slots__ = ("children", "single", "multi", "values", "topic_filter")

    def __init__(self):
        self.children = None
        self.single = None
        self.multi = None
        self.values = None
        self.topic_filter = None

    def is_empty(self):
        return (not self.children and self.single is None and self.multi is None
                and self.values is None)


class SubscriptionTrie:
    """A set of (topic filter, value) subscriptions, matched level by level.

    Values are opaque to the trie but must be hashable (the broker stores
    ``(client id, options)``); a pair is held at most once.  A shared
    subscription is added under the filter ``parse_shared`` returns, with its
    ShareName kept in the value.

    ``match(topic)`` follows only the branches a topic's levels can reach: at
    each level, from each live node, the literal child for that level, the '+'
    child, and the '#' child (whose subscriptions match there and then).  Its
    cost grows with the number of levels and the wildcard branches actually
    present, not with the number of subscriptions.
    """

    __slots__ = ("_root", "_count")

    def __init__(self):
        self._root = _Node()
        self._count = 0

    def __len__(self):
        return self._count

    def add(self, topic_filter, value):
        """Subscribe ``value`` to ``topic_filter``; False if already there.

        Raises TopicFilterInvalid for an invalid filter and ValueError for a
        ``$share/...`` filter (add its inner filter instead).
        """
        share_name, _ = parse_shared(topic_filter)
        if share_name is not None:
            raise ValueError(
                f"{_show(topic_filter)} is a shared subscription: add the filter "
                "parse_shared returns and keep the ShareName in the value")
        node = self._root
        for level in topic_filter.split(SEPARATOR):
            if level == SINGLE:
                child = node.single
                if child is None:
                    child = node.single = _Node()
            elif level == MULTI:
                child = node.multi
                if child is None:
                    child = node.multi = _Node()
            else:
                if node.children is None:
                    node.children = {}
                child = node.children.get(level)
                if child is None:
                    child = node.children[level] = _Node()
            node = child
        if node.values is None:
            node.values = {}
            node.topic_filter = topic_filter
        elif value in node.values:
            return False
        node.values[value] = None
        self._count += 1
        return True

    def remove(self, topic_filter, value):
        """Unsubscribe ``value`` from ``topic_filter``; False if it was not there.

        Nodes left without subscriptions or children are pruned, so a broker
        with churning subscriptions does not grow the trie.
        """
        node = self._root
        path = []
        for level in topic_filter.split(SEPARATOR):
            if level == SINGLE:
                child = node.single
            elif level == MULTI:
                child = node.multi
            else:
                child = node.children.get(level) if node.children else None
            if child is None:
                return False
            path.append((node, level))
            node = child
        if node.values is None or value not in node.values:
            return False
        del node.values[value]
        self._count -= 1
        if node.values:
            return True
        node.values = None
        node.topic_filter = None
        for parent, level in reversed(path):
            if not node.is_empty():
                break
            if level == SINGLE:
                parent.single = None
            elif level == MULTI:
                parent.multi = None
            else:
                del parent.children[level]
            node = parent
        return True

    def match(self, topic):
        """Every (filter, value) whose filter matches the topic name ``topic``.

        Each subscription appears once; the order is deterministic but not
        specified.
        """
        found = []
        levels = topic.split(SEPARATOR)
        root = self._root
        frontier = []
        spare = []
        first = levels[0]
        if root.children is not None:
            child = root.children.get(first)
            if child is not None:
                frontier.append(child)
        # MQTT 5.0 §4.7.2 [MQTT-4.7.2-1]: a topic name beginning with '$' is
        # not matched by a filter beginning with '+' or '#'.
        if not first.startswith("$"):
            multi = root.multi
            if multi is not None:
                topic_filter = multi.topic_filter
                for value in multi.values:
                    found.append((topic_filter, value))
            if root.single is not None:
                frontier.append(root.single)
        index = 1
        depth = len(levels)
        while frontier and index < depth:
            level = levels[index]
            index += 1
            for node in frontier:
                multi = node.multi
                if multi is not None:
                    topic_filter = multi.topic_filter
                    for value in multi.values:
                        found.append((topic_filter, value))
                children = node.children
                if children is not None:
                    child = children.get(level)
                    if child is not None:
                        spare.append(child)
                if node.single is not None:
                    spare.append(node.single)
            frontier, spare = spare, frontier
            spare.clear()
        # Here the frontier is empty or holds the nodes at the topic's depth.
        for node in frontier:
            values = node.values
            if values is not None:
                topic_filter = node.topic_filter
                for value in values:
                    found.append((topic_filter, value))
            # §4.7.1.2: '#' also matches the parent level ("sport/#"
            # matches "sport").
            multi = node.multi
            if multi is not None:
                topic_filter = multi.topic_filter
                for value in multi.values:
                    found.append((topic_filter, value))
        return found

    def __iter__(self):
        """Every (filter, value) pair held, depth first."""
        stack = [self._root]
        while stack:
            node = stack.pop()
            if node.values is not None:
                topic_filter = node.topic_filter
                for value in node.values:
                    yield topic_filter, value
            if node.multi is not None:
                stack.append(node.multi)
            if node.single is not None:
                stack.append(node.single)
            if node.children:
                stack.extend(node.children.values())
