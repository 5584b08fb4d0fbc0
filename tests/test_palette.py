"""k2mini.lab.palette: one colour per thing, the same in every notebook and every call."""

import itertools

from matplotlib import colors as mcolors

from k2mini.lab import plots, plots_stability
from k2mini.lab.palette import FIXED, colors

KNOWN = list(FIXED)


def rgb(name):
    return mcolors.to_rgb(name)


def test_fixed_colours_whatever_the_order_and_company():
    expected = {label: rgb(FIXED[label]) for label in KNOWN}
    assert colors(KNOWN) == expected
    assert colors(reversed(KNOWN)) == expected
    for a, b in itertools.permutations(["adamw", "muon", "muonclip", "none", "loss_free"], 2):
        got = colors([a, "E=8", b, "muonclip tau=30"])
        assert got[a] == expected[a] and got[b] == expected[b], (a, b)
    assert len(set(expected.values())) == len(expected)  # no two known names share a colour


def test_muonclip_taus_get_colours_of_their_own():
    two = colors(["adamw", "muonclip tau=30", "muonclip tau=100"])
    assert two["muonclip tau=30"] == rgb(FIXED["muonclip"])  # the first MuonClip group is MuonClip's green
    assert two["muonclip tau=100"] != two["muonclip tau=30"] and two["muonclip tau=100"] != two["adamw"]
    many = colors([f"muonclip tau={t}" for t in (10, 30, 100, 300)] + ["muon", "adamw"])
    assert len(set(many.values())) == len(many)
    # plain "muonclip" keeps its green whatever the order; a tau group beside it takes another colour
    for labels in (["muonclip", "muonclip tau=30"], ["muonclip tau=30", "muonclip"]):
        got = colors(labels)
        assert got["muonclip"] == rgb(FIXED["muonclip"]) and got["muonclip tau=30"] != got["muonclip"], labels


def test_other_labels_never_take_a_present_fixed_colour():
    for present in (["adamw", "muon", "muonclip"], ["none", "aux_loss", "loss_free", "loss_free+seq_aux"], KNOWN):
        others = ([f"E={e}" for e in (8, 16, 32)] + ["0.001", "0.01"])[: 10 - len(present)]  # tab10 has room
        got = colors(others[:2] + present + others[2:])
        taken = {got[label] for label in present}
        assert not taken & {got[label] for label in others}, present
        assert len({got[label] for label in others}) == len(others)  # and differ from one another
    # with no fixed label present, labels take tab10 in order, all different
    free = colors([f"E={e}" for e in (8, 16, 32, 64)])
    assert len(set(free.values())) == 4


def test_same_label_same_colour_across_calls():
    labels = ["E=8", "adamw", "muonclip tau=30", "E=16", "muonclip tau=100", "none"]
    assert colors(labels) == colors(list(labels)) == colors(labels + labels)  # deterministic, repeats ignored
    assert colors(labels) is not colors(labels)  # a fresh dict each time: a caller may edit it
    assert colors([1, 2]) == colors(["1", "2"])  # labels as strings
    groups = ["adamw", "muon", "muonclip tau=30", "muonclip tau=100"]
    table = colors(groups)
    assert {g: plots_stability.group_color(g, groups) for g in groups} == {g: table[g] for g in groups}
    assert plots.colors is colors and not hasattr(plots, "method_colors")
