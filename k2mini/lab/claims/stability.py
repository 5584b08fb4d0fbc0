"""Notebook 04's checked claims: what QK-Clip does to Muon's attention logits, at what cost, when it
stops, and how Muon and AdamW compare. Each takes the sweep's summary table (`stability.summarize`) or
a run's history and returns a `Verdict`; none trains anything.

Where a claim is about the clip, its arm is compared with plain Muon at the same learning rate, so
the same claim on a MuonClip run whose tau sits above every logit (the clip never fires: the run is
Muon's, bit for bit) is False.
"""

from __future__ import annotations

import math

from . import Verdict, claim
from ..stability import tokens_to_reach

__all__ = ["clip_caps_fresh_logits", "clip_cuts_peak_cheaply", "clip_fades_as_lr_decays",
           "adamw_logits_exceed_muon", "muon_beats_adamw"]


def _row(table, group: str, lr: float):
    rows = table[(table["group"] == group) & (table["lr"] == lr)]
    if len(rows) != 1:
        raise ValueError(f"the summary table has {len(rows)} rows for group {group!r} at lr {lr:g}, expected one")
    return rows.iloc[0]


def _group(tau: float) -> str:
    return f"muonclip tau={tau:g}"


@claim("04", control="a MuonClip run whose tau sits above every logit (the clip never fires: it is Muon's run), "
                     "or Muon's own run in the MuonClip arm")
def clip_caps_fresh_logits(table, *, lr: float, tau: float, cap: float = 1.5, need: float = 3.0) -> Verdict:
    """With QK-Clip at tau, the max logit on every step's fresh batch stays below `cap` x tau, where plain
    Muon at the same lr passes `need` x tau.

    The logit checked is the one `train()` records before each step, on that step's batch, with the
    weights the previous step left (updated and clipped): the clip never saw this batch, so nothing
    makes it <= tau by construction. (On the batch it clipped with, the first layer's max logit is
    tau times the step's own growth, by the clip's arithmetic: not a result.) Margin: the smaller of
    the two distances to the bounds, in units of tau.
    """
    clip_peak = float(_row(table, _group(tau), lr)["peak_max_logit"])
    muon_peak = float(_row(table, "muon", lr)["peak_max_logit"])
    capped, needed = cap - clip_peak / tau, muon_peak / tau - need
    margin = min(capped, needed)
    holds = bool(math.isfinite(margin) and margin > 0)
    return Verdict(f"at lr {lr:g}, MuonClip (tau={tau:g}) keeps every fresh batch's max logit below {cap:g} tau, "
                   f"where Muon's passes {need:g} tau", holds, margin,
                   f"peak max logit: MuonClip {clip_peak / tau:.3f} tau, Muon {muon_peak / tau:.3f} tau")


@claim("04", control="a MuonClip run whose tau sits above every logit (identical arms: ratio 1), or the arms swapped")
def clip_cuts_peak_cheaply(table, *, lr: float, tau: float, factor: float = 2.0, max_cost: float = 0.05) -> Verdict:
    """At `lr`, QK-Clip (tau) divides Muon's peak max logit by more than `factor`, and at every lr of the
    table it costs less than `max_cost` nats of final validation loss against Muon.

    Margin: the smaller of (ratio / factor - 1) and (max_cost - worst cost) / max_cost, both relative.
    """
    clip_peak = float(_row(table, _group(tau), lr)["peak_max_logit"])
    muon_peak = float(_row(table, "muon", lr)["peak_max_logit"])
    ratio = muon_peak / clip_peak
    lrs = sorted(set(table.loc[table["group"] == _group(tau), "lr"]))
    costs = {x: float(_row(table, _group(tau), x)["final_val_loss"]) - float(_row(table, "muon", x)["final_val_loss"])
             for x in lrs}
    worst = max(costs.values())
    margin = min(ratio / factor - 1, (max_cost - worst) / max_cost)
    holds = bool(math.isfinite(margin) and margin > 0)
    return Verdict(f"the clip (tau={tau:g}) divides Muon's peak max logit at lr {lr:g} by more than {factor:g}, "
                   f"for less than {max_cost:g} nats at every lr", holds, margin,
                   f"peak ratio {ratio:.2f}; val loss minus Muon's: "
                   + ", ".join(f"lr {x:g} {c:+.3f}" for x, c in costs.items()))


@claim("04", control="the same run at a constant learning rate in both arms (it keeps clipping), or a run whose clip "
                     "never fires")
def clip_fades_as_lr_decays(decayed: list[int], constant: list[int], *, fade: float = 0.5, keep: float = 0.5,
                            min_busy: int = 5) -> Verdict:
    """Clipped steps per part of the run (`stability.clips_per_part`), each relative to the run's busiest part:
    under the cosine decay the last part clips less than `fade` times as often as the same run's last
    part at a constant lr, and the constant-lr run still clips more than `keep` times as often as its
    busiest (so the fading comes from the schedule, not from training settling by itself). Both
    busiest parts need >= `min_busy` clips.

    Margin: the smaller of (fade - decayed share / constant share) and (constant share - keep).
    """
    def share(counts):
        busiest = max(counts)
        return counts[-1] / busiest if busiest >= min_busy else float("nan")

    d, c = share(decayed), share(constant)
    margin = min(fade - d / c, c - keep) if c > 0 else float("nan")
    holds = bool(math.isfinite(margin) and margin > 0)
    return Verdict(f"the clip fades as the lr decays: in its last part the cosine run clips less than {fade:g} times as "
                   f"often (for its busiest part) as the same run at a constant lr, which keeps clipping", holds, margin,
                   f"clipped steps per part: cosine {list(decayed)}, constant {list(constant)}; last part over the "
                   f"busiest: cosine {d:.2f}, constant {c:.2f}")


@claim("04", control="the arms swapped (Muon's table as AdamW's) or identical")
def adamw_logits_exceed_muon(table, *, factor: float = 2.0) -> Verdict:
    """At every learning rate of the sweep, AdamW's peak max logit is more than `factor` times Muon's.

    Margin: the smallest ratio over the lrs, divided by `factor`, minus 1.
    """
    lrs = sorted(set(table.loc[table["group"] == "muon", "lr"]))
    ratios = {lr: float(_row(table, "adamw", lr)["peak_max_logit"]) / float(_row(table, "muon", lr)["peak_max_logit"])
              for lr in lrs}
    margin = min(ratios.values()) / factor - 1
    holds = bool(math.isfinite(margin) and margin > 0)
    return Verdict(f"AdamW's peak max logit is more than {factor:g}x Muon's at every lr", holds, margin,
                   "AdamW / Muon: " + ", ".join(f"lr {lr:g} {r:.2f}x" for lr, r in ratios.items()))


@claim("04", control="the arms swapped (AdamW's run as Muon's), or identical")
def muon_beats_adamw(muon, adamw, *, gap: float = 0.02, share: float = 0.75) -> Verdict:
    """Each at its best lr (`stability.best_runs`), Muon ends more than `gap` nats below AdamW and reaches
    AdamW's final validation loss within `share` of the run's tokens. `muon`, `adamw`: RunResults (or
    anything with `history` holding tokens and val_loss, and `final_val_loss()`).

    Margin: the smaller of (loss gap - gap) / gap and (share - tokens needed / run tokens) / share.
    """

    target = adamw.final_val_loss()
    d = muon.final_val_loss()
    run_tokens = float(muon.history["tokens"].max())
    t = tokens_to_reach(muon, target) / run_tokens
    margin = min((target - d - gap) / gap, (share - t) / share if math.isfinite(t) else -1.0)
    holds = bool(math.isfinite(margin) and margin > 0)
    return Verdict(f"Muon ends more than {gap:g} nats below AdamW and reaches AdamW's final loss within "
                   f"{share:.0%} of the tokens", holds, margin,
                   f"final val loss Muon {d:.3f}, AdamW {target:.3f}; Muon reaches it after "
                   + ("never" if not math.isfinite(t) else f"{t:.0%} of the tokens"))
