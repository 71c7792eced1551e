"""Topic names, topic filters and matching: MQTT 5.0 §4.7 / 3.1.1 §4.7, §4.8.2."""

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from pushcore.errors import MQTTError, TopicFilterInvalid, TopicNameInvalid
from pushcore.topics import (
    SubscriptionTrie,
    matches,
    parse_shared,
    validate_filter,
    validate_topic,
)

# (filter, topic, matches?)
MATCH_CASES = [
    # §4.7.1.2 multi-level wildcard, the spec's own examples.
    ("sport/tennis/player1/#", "sport/tennis/player1", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
    ("sport/#", "sport", True),
    ("#", "sport/tennis/player1", True),
    ("sport/tennis/#", "sport/tennis/player2", True),
    # §4.7.1.3 single-level wildcard, the spec's own examples.
    ("sport/tennis/+", "sport/tennis/player1", True),
    ("sport/tennis/+", "sport/tennis/player2", True),
    ("sport/tennis/+", "sport/tennis/player1/ranking", False),
    ("sport/+", "sport", False),
    ("sport/+", "sport/", True),
    ("+", "finance", True),
    ("+/tennis/#", "sport/tennis/player1", True),
    ("sport/+/player1", "sport/tennis/player1", True),
    ("+/+", "/finance", True),
    ("/+", "/finance", True),
    ("+", "/finance", False),
    # §4.7.2 topics beginning with '$', the spec's own examples.
    ("#", "$SYS/broker/clients", False),
    ("+/monitor/Clients", "$SYS/monitor/Clients", False),
    ("$SYS/#", "$SYS/monitor/Clients", True),
    ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
    ("#", "$SYS", False),
    ("+", "$SYS", False),
    ("$SYS/#", "$SYS", True),
    ("+/#", "$SYS", False),
    ("$", "$", True),
    ("#", "$", False),
    # The '$' rule is about the first character of the topic only.
    ("a/+", "a/$b", True),
    ("a/#", "a/$b/c", True),
    ("+/x", "a$/x", True),
    # §4.7.3: case sensitive, spaces allowed, leading and trailing '/' matter,
    # '/' alone is a topic, no normalization [MQTT-4.7.3-4].
    ("ACCOUNTS", "Accounts", False),
    ("Accounts payable", "Accounts payable", True),
    ("/finance", "finance", False),
    ("finance/", "finance", False),
    ("/", "/", True),
    ("+/+", "/", True),
    ("+", "/", False),
    ("#", "/", True),
    ("/#", "/", True),
    ("caf\u00e9", "cafe\u0301", False),
    ("\ufeffa", "a", False),
    ("caf\u00e9/+", "caf\u00e9/\U0001f600", True),
    # Zero-length levels are levels (§4.7.1.1).
    ("a//b", "a//b", True),
    ("a/b", "a//b", False),
    ("a/+/b", "a//b", True),
    ("+/+/+", "a//b", True),
    ("+/+", "a//b", False),
    ("a/#", "a//b", True),
    ("a/+", "a/", True),
    ("a/+/+", "a//", True),
    ("//", "//", True),
    ("+/#", "a", True),
    ("+/+/#", "a", False),
    ("+/+/#", "a/b", True),
    ("a/+/#", "a", False),
    # '#' matches every depth below, '+' exactly one.
    ("a/#", "a/b/c/d/e", True),
    ("a/#", "b", False),
    ("a/#", "ab", False),
    ("a/+/c", "a/b/c/d", False),
    ("a/+/c", "a/b", False),
    ("a/b/c", "a/b/c", True),
    ("a/b/c", "a/b/c/", False),
]


@pytest.mark.parametrize("topic_filter, topic, expected", MATCH_CASES)
def test_matches_table(topic_filter, topic, expected):
    validate_filter(topic_filter)
    validate_topic(topic)
    assert matches(topic_filter, topic) is expected


@pytest.mark.parametrize("topic_filter, topic, expected", MATCH_CASES)
def test_trie_table(topic_filter, topic, expected):
    trie = SubscriptionTrie()
    trie.add(topic_filter, "v")
    assert trie.match(topic) == ([(topic_filter, "v")] if expected else [])


def test_trie_holds_the_whole_table():
    trie = SubscriptionTrie()
    filters = sorted({f for f, _, _ in MATCH_CASES})
    for i, topic_filter in enumerate(filters):
        assert trie.add(topic_filter, i)
    for topic_filter, topic, expected in MATCH_CASES:
        found = trie.match(topic)
        assert ((topic_filter, filters.index(topic_filter)) in found) is expected
        assert sorted(found) == sorted((f, i) for i, f in enumerate(filters) if matches(f, topic))


# ---------------------------------------------------------------------------
# Validation

VALID_FILTERS = [
    "#", "+", "+/+", "/", "//", "/#", "+/#", "sport/tennis/#", "sport/+/player1",
    "+/tennis/#", "$SYS/#", "$SYS/monitor/+", "a b", "caf\u00e9/+", "\U0001f600",
    "a" * 65535,
    "\u00e9" * 32767 + "a",           # 65535 bytes in UTF-8
    "$shared/x",                      # first level is not "$share"
    "$SHARE/g/x",                     # matching is case sensitive (§4.7.3)
    "x/$share/g",
]

INVALID_FILTERS = [
    ("", "empty"),
    ("sport/tennis#", "'#' must be a whole level"),
    ("sport/tennis/#/ranking", "'#' must be the last level"),
    ("#/a", "'#' must be the last level"),
    ("#/#", "'#' must be the last level"),
    ("a/#/", "'#' must be the last level"),
    ("a/#b", "'#' must be a whole level"),
    ("##", "'#' must be a whole level"),
    ("+#", "'#' must be a whole level"),
    ("sport+", "'+' must be a whole level"),
    ("+a", "'+' must be a whole level"),
    ("a/+b/c", "'+' must be a whole level"),
    ("++", "'+' must be a whole level"),
    ("a/b+", "'+' must be a whole level"),
    ("\x00", "U+0000"),
    ("a/\x00/b", "U+0000"),
    ("a\ud800", "lone surrogate"),
    ("a" * 65536, "65536 bytes"),
    ("\u00e9" * 32768, "65536 bytes"),
    ("\U0001f600" * 16384, "65536 bytes"),
]


@pytest.mark.parametrize("topic_filter", VALID_FILTERS)
def test_valid_filters(topic_filter):
    assert validate_filter(topic_filter) is None
    assert parse_shared(topic_filter) == (None, topic_filter)


@pytest.mark.parametrize("topic_filter, message", INVALID_FILTERS)
def test_invalid_filters(topic_filter, message):
    with pytest.raises(TopicFilterInvalid, match=re.escape(message)) as info:
        validate_filter(topic_filter)
    assert isinstance(info.value, MQTTError)
    # MQTT 5.0 §2.4: 0x8F Topic Filter invalid.
    assert info.value.reason_code == 0x8F
    assert len(str(info.value)) < 200
    with pytest.raises(TopicFilterInvalid):
        parse_shared(topic_filter)
    with pytest.raises(TopicFilterInvalid):
        SubscriptionTrie().add(topic_filter, 1)


SHARED = [
    # §4.8.2, the spec's own examples.
    ("$share/consumer1/sport/tennis/+", "consumer1", "sport/tennis/+"),
    ("$share/consumer2/sport/tennis/+", "consumer2", "sport/tennis/+"),
    ("$share/consumer1//finance", "consumer1", "/finance"),
    ("$share/g/#", "g", "#"),
    ("$share/g/+", "g", "+"),
    ("$share/g/$SYS/#", "g", "$SYS/#"),
    ("$share/group one/a//b", "group one", "a//b"),
    ("$share/$g/a", "$g", "a"),
    ("$share/g//", "g", "/"),
]

INVALID_SHARED = [
    ("$share", "no ShareName"),
    ("$share/", "no ShareName"),
    ("$share//x", "no ShareName"),
    ("$share/g", "no topic filter"),
    ("$share/g/", "no topic filter"),
    ("$share/g+/x", "contains '+' or '#'"),
    ("$share/+/x", "contains '+' or '#'"),
    ("$share/#/x", "contains '+' or '#'"),
    ("$share/a#b/x", "contains '+' or '#'"),
    ("$share/g/a/#/b", "'#' must be the last level"),
    ("$share/g/sport+", "'+' must be a whole level"),
    ("$share/g/$share/h/x", "nests another $share"),
    ("$share/g/\x00", "U+0000"),
    ("$share/g/" + "a" * 65528, "65537 bytes"),
]


@pytest.mark.parametrize("topic_filter, share_name, inner", SHARED)
def test_parse_shared(topic_filter, share_name, inner):
    assert parse_shared(topic_filter) == (share_name, inner)
    assert validate_filter(topic_filter) is None


@pytest.mark.parametrize("topic_filter, message", INVALID_SHARED)
def test_invalid_shared(topic_filter, message):
    with pytest.raises(TopicFilterInvalid, match=re.escape(message)) as info:
        parse_shared(topic_filter)
    assert info.value.reason_code == 0x8F
    with pytest.raises(TopicFilterInvalid):
        validate_filter(topic_filter)


def test_trie_refuses_a_shared_filter():
    # The trie matches topics; the ShareName belongs in the value.
    trie = SubscriptionTrie()
    with pytest.raises(ValueError, match="shared subscription"):
        trie.add("$share/g/a/+", ("c1", 1))
    share_name, inner = parse_shared("$share/g/a/+")
    assert trie.add(inner, (share_name, "c1", 1))
    assert trie.match("a/b") == [("a/+", ("g", "c1", 1))]
    assert trie.match("$share/g/a/b") == []


VALID_TOPICS = ["a", "/", "//", "a//b", "$SYS/broker", "$", "a b", "caf\u00e9", "a" * 65535,
                "$share/g/x"]

INVALID_TOPICS = [
    ("", "empty"),
    ("a/+", "wildcard"),
    ("a/#", "wildcard"),
    ("+", "wildcard"),
    ("a+b", "wildcard"),
    ("a#", "wildcard"),
    ("a\x00b", "U+0000"),
    ("\udfff", "lone surrogate"),
    ("a" * 65536, "65536 bytes"),
    ("\u00e9" * 32768, "65536 bytes"),
]


@pytest.mark.parametrize("topic", VALID_TOPICS)
def test_valid_topics(topic):
    assert validate_topic(topic) is None


@pytest.mark.parametrize("topic, message", INVALID_TOPICS)
def test_invalid_topics(topic, message):
    with pytest.raises(TopicNameInvalid, match=re.escape(message)) as info:
        validate_topic(topic)
    assert isinstance(info.value, MQTTError)
    # MQTT 5.0 §2.4: 0x90 Topic Name invalid.
    assert info.value.reason_code == 0x90


# ---------------------------------------------------------------------------
# SubscriptionTrie


def test_trie_add_remove_len_iter():
    trie = SubscriptionTrie()
    assert len(trie) == 0
    assert list(trie) == []
    assert trie.add("a/+", "c1")
    assert trie.add("a/+", "c2")
    assert trie.add("#", "c1")
    assert not trie.add("a/+", "c1")          # a pair is held once
    assert len(trie) == 3
    assert sorted(trie) == [("#", "c1"), ("a/+", "c1"), ("a/+", "c2")]
    assert sorted(trie.match("a/b")) == [("#", "c1"), ("a/+", "c1"), ("a/+", "c2")]
    assert trie.match("$a/b") == []

    assert trie.remove("a/+", "c1")
    assert not trie.remove("a/+", "c1")
    assert not trie.remove("a/+", "c3")
    assert not trie.remove("a/b", "c2")
    assert not trie.remove("a/+/c", "c2")
    assert not trie.remove("$share/g/a/+", "c2")
    assert len(trie) == 2
    assert sorted(trie.match("a/b")) == [("#", "c1"), ("a/+", "c2")]
    assert trie.remove("#", "c1")
    assert trie.remove("a/+", "c2")
    assert len(trie) == 0
    assert list(trie) == [] and trie.match("a/b") == []


def test_trie_match_keeps_insertion_order_per_filter():
    trie = SubscriptionTrie()
    for client in ("c3", "c1", "c2"):
        trie.add("t", client)
    assert trie.match("t") == [("t", "c3"), ("t", "c1"), ("t", "c2")]


def test_trie_prunes_removed_branches():
    # A broker's subscriptions churn; the trie must not keep dead nodes.
    trie = SubscriptionTrie()
    filters = [f"dev/{i}/+/x/#" for i in range(200)] + ["+/+/#", "#", "a//b", "a/+"]
    for topic_filter in filters:
        trie.add(topic_filter, 1)
        trie.add(topic_filter, 2)
    for topic_filter in filters:
        assert trie.remove(topic_filter, 2)
    assert len(trie) == len(filters)
    for topic_filter in filters:
        assert trie.remove(topic_filter, 1)
    root = trie._root
    assert not root.children and root.single is None and root.multi is None
    assert len(trie) == 0


def test_trie_values_are_opaque_but_hashable():
    trie = SubscriptionTrie()
    options = ("client-1", (1, False, True, 0))
    trie.add("a/#", options)
    assert trie.match("a") == [("a/#", options)]
    with pytest.raises(TypeError):
        trie.add("a/#", ["unhashable"])


def test_trie_matches_deep_topics():
    trie = SubscriptionTrie()
    deep = "/".join(["x"] * 2000)
    trie.add(deep, 1)
    trie.add("+/" * 1999 + "+", 2)
    trie.add("x/#", 3)
    assert sorted(trie.match(deep)) == [("+/" * 1999 + "+", 2), ("x/#", 3), (deep, 1)]
    assert trie.match(deep + "/x") == [("x/#", 3)]


# ---------------------------------------------------------------------------
# Property tests


def reference_matches(topic_filter, topic):
    """A regex translation of §4.7, independent of the split-and-walk code."""
    # §4.7.2 [MQTT-4.7.2-1]
    if topic.startswith("$") and topic_filter[0] in "+#":
        return False
    if topic_filter == "#":
        pattern = ".*"
    else:
        tail = ""
        body = topic_filter
        if body.endswith("/#"):
            # '#' matches the parent level too: the "/..." part is optional.
            body, tail = body[:-2], "(?:/.*)?"
        pattern = "/".join("[^/]*" if level == "+" else re.escape(level)
                           for level in body.split("/")) + tail
    return re.fullmatch(pattern, topic, re.DOTALL) is not None


# Few level names, so that filters and topics meet often.
TOPIC_LEVELS = st.sampled_from(["a", "b", "", "a.b", "\u00e9"])
FIRST_TOPIC_LEVELS = st.sampled_from(["a", "b", "", "$SYS", "$"])


@st.composite
def topics(draw):
    first = draw(FIRST_TOPIC_LEVELS)
    rest = draw(st.lists(TOPIC_LEVELS, max_size=4))
    return "/".join([first, *rest])


@st.composite
def filters(draw):
    levels = draw(st.lists(st.sampled_from(["a", "b", "", "+", "a.b"]), min_size=1, max_size=4))
    if draw(st.booleans()):
        levels[0] = draw(st.sampled_from(["$SYS", "$", "+", "a"]))
    if draw(st.booleans()):
        levels.append("#")
    elif draw(st.integers(0, 5)) == 0:
        levels = ["#"]
    # A lone empty level would be the empty string, which is not a filter.
    topic_filter = "/".join(levels) or "/"
    validate_filter(topic_filter)
    return topic_filter


@settings(max_examples=300, deadline=None)
@given(filters(), topics())
def test_matches_agrees_with_regex_reference(topic_filter, topic):
    assert matches(topic_filter, topic) == reference_matches(topic_filter, topic)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ab/+#$", min_size=0, max_size=8))
def test_validity_agrees_with_grammar(text):
    # §4.7.1: each level is '+', '#' (last only) or free of wildcards.
    valid_filter = re.fullmatch(r"(?:(?:[^/+#]*|\+)/)*(?:[^/+#]*|\+|#)", text) is not None
    valid_filter = valid_filter and text != ""
    try:
        validate_filter(text)
    except TopicFilterInvalid:
        assert not valid_filter
    else:
        assert valid_filter
    valid_topic = text != "" and "+" not in text and "#" not in text
    try:
        validate_topic(text)
    except TopicNameInvalid:
        assert not valid_topic
    else:
        assert valid_topic


class TrieAgainstBruteForce(RuleBasedStateMachine):
    """SubscriptionTrie against a plain set scanned with matches()."""

    def __init__(self):
        super().__init__()
        self.trie = SubscriptionTrie()
        self.model = set()

    @rule(topic_filter=filters(), value=st.integers(0, 2))
    def add(self, topic_filter, value):
        added = self.trie.add(topic_filter, value)
        assert added == ((topic_filter, value) not in self.model)
        self.model.add((topic_filter, value))

    @rule(topic_filter=filters(), value=st.integers(0, 2))
    def remove(self, topic_filter, value):
        removed = self.trie.remove(topic_filter, value)
        assert removed == ((topic_filter, value) in self.model)
        self.model.discard((topic_filter, value))

    @rule(data=st.data())
    def remove_existing(self, data):
        if self.model:
            pair = data.draw(st.sampled_from(sorted(self.model)))
            assert self.trie.remove(*pair)
            self.model.discard(pair)

    @rule(topic=topics())
    def match(self, topic):
        expected = sorted(pair for pair in self.model if matches(pair[0], topic))
        assert sorted(self.trie.match(topic)) == expected

    @invariant()
    def same_contents(self):
        assert len(self.trie) == len(self.model)
        pairs = list(self.trie)
        assert len(pairs) == len(self.model) and set(pairs) == self.model


TrieAgainstBruteForce.TestCase.settings = settings(
    max_examples=100, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_trie_against_brute_force = TrieAgainstBruteForce.TestCase
