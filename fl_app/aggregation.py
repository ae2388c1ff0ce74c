"""How the server folds client updates into one: the run-config key `aggregation`.

    mean                   the example-weighted mean (FedAvg, McMahan et al., 2017)
    median                 the coordinate-wise median (Yin et al., ICML 2018)
    trimmed-mean:<f>       the coordinate-wise mean after dropping the fraction f (0 <= f < 0.5) of the
                           lowest and of the highest values (Yin et al., 2018)
    norm-clip[:<factor>]   before folding, each update's movement from the current global model (root mean
                           square over the coordinates it holds) is clipped to factor (default 2) x the
                           round's median (norm bounding, Sun et al., "Can You Really Backdoor Federated
                           Learning?", 2019); relative to the round's own updates, so it needs no tuning per
                           model or learning rate. REFT's ensemble instead floors each client's log
                           probabilities (`fold_logits`)
    fltrust                before folding, the server trains each update's own job on its root dataset
                           (the public slice, labelled, held out of every client's data) and scores the
                           update by ReLU(cosine) between its movement and the server's; the movement is
                           rescaled to the server's norm and the score becomes the update's fold weight
                           (FLTrust: Cao, Fang, Liu and Gong, "FLTrust: Byzantine-robust Federated
                           Learning via Trust Bootstrapping", NDSS 2021; `trust_normalised`). It bounds
                           attackers however few honest clients hold a part of the model, which the
                           statistics of the round alone cannot. It is a rule of its own, taken alone:
                           the fold is the trust-weighted mean (clipping would be moot, every update has
                           the server's norm).
                           REFT's replies are predictions on the root dataset itself, so their trust is
                           the cosine between their log probabilities and the labels (`label_trust`),
                           each row floored at LOG_ODDS_FLOOR as under clipping
    fltrust:labels         fltrust, and an update that lowers the probability its submodel gives the
                           root dataset's labels (on average over the root set, by more than
                           LABEL_CHECK_Z standard errors; `label_probability_change`) gets trust 0
                           (our extension; FLTrust's server already holds those labels). A label
                           flipper's body moves like the server's step, so its FLTrust cosine stays > 0
                           (up to 0.28 for DepthFL on MNIST), while its predictions move away from the
                           labels. REFT's logits are scored as under fltrust. Not the default: on
                           label-skewed clients (Dirichlet 0.5) it refuses honest updates too, and
                           costs FedRolex 6 points of clean accuracy against fltrust
                           (benchmarks/results/attacks_dirichlet0.5.txt)
    norm-clip:2+median     clipping combined with mean, median or trimmed mean ('+' joins them, in either order)

Median and trimmed mean count every client of weight > 0 once (order statistics are unweighted): a client
cannot buy more influence by claiming more examples. Every fold accumulates in float64, so a huge but
finite value cannot overflow the sum, and is cast back to the global model's dtype only at the end.

Strategies call one of two folds, each over the clients that hold a coordinate:
`fold_states` (whole or width-scaled model states: FedAvg's family, ProFL's active block, HeteroFL and
FedRolex's channels, DepthFL's held tensors) and `fold_logits` (REFT's ensemble, per public example).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

RULES = ("mean", "median", "trimmed-mean")
DEFAULT_CLIP_FACTOR = 2.0
STATISTICS = ("running_mean", "running_var")  # BatchNorm's running statistics: measured, not learned
LOG_ODDS_FLOOR = math.log(1e-4)  # REFT's ensemble under clipping: log probabilities below this are raised to it
Index = tuple[torch.Tensor, ...]  # an advanced index placing a submodel tensor into its global tensor


class AggregationError(ValueError):
    """An `aggregation` value that is not one of the documented forms."""


@dataclass(frozen=True)
class Aggregation:
    """A fold rule (`rule`, with `trim` for trimmed-mean), optional clipping at `clip` x the median norm,
    whether updates are first scored against the server's root update (`trust`, FLTrust), and whether an
    update that lowers the root labels' probability is refused (`labels`, fltrust:labels)."""

    rule: str = "mean"
    trim: float = 0.0
    clip: float | None = None
    trust: bool = False
    labels: bool = False

    @staticmethod
    @lru_cache(maxsize=32)
    def parse(text: str) -> Aggregation:
        """`"norm-clip:2+median"` -> Aggregation("median", clip=2.0); AggregationError naming the fix."""
        rule, trim, clip, trust, labels, written = None, 0.0, None, False, False, ""
        for part in (p.strip() for p in text.split("+")):
            name, _, arg = part.partition(":")
            try:
                if name == "norm-clip" and clip is None:
                    clip = float(arg) if arg else DEFAULT_CLIP_FACTOR
                    if not (math.isfinite(clip) and clip > 0):
                        raise ValueError("the clip factor must be a finite number > 0")
                elif name == "fltrust" and not trust and arg in ("", "labels"):
                    trust, labels, written = True, arg == "labels", part
                elif name in RULES and rule is None:
                    if (name == "trimmed-mean") != bool(arg):
                        raise ValueError("trimmed-mean takes a fraction (trimmed-mean:0.1); the others take none")
                    trim = float(arg) if arg else 0.0
                    if not 0 <= trim < 0.5:
                        raise ValueError("the trimmed fraction must be in [0, 0.5)")
                    rule = name
                else:
                    raise ValueError(f"{part!r} is not a rule, or repeats one")
            except ValueError as exc:
                raise AggregationError(f"aggregation = {text!r}: {exc}; valid: mean, median, trimmed-mean:<f>, "
                                       "norm-clip[:<factor>], norm-clip joined to a rule by '+' (e.g. "
                                       "norm-clip:2+median), fltrust or fltrust:labels") from exc
        if trust and (rule or clip):
            raise AggregationError(f"aggregation = {text!r}: fltrust is a rule of its own (its fold is the "
                                   "trust-weighted mean of normalised updates); write aggregation = "
                                   f"{written!r}")
        return Aggregation(rule or "mean", trim, clip, trust, labels)

    def clip_scales(self, distances: torch.Tensor) -> torch.Tensor:
        """[n] distances (float64, >= 0) -> [n] factors in (0, 1] that bring each to at most `clip` x their
        median (all ones without clipping). A zero median (nothing moved) clips nothing."""
        ones = torch.ones_like(distances)
        if self.clip is None or len(distances) == 0:
            return ones
        bound = self.clip * distances.quantile(0.5)  # an even count: the mean of the two middle ones
        if bound <= 0:
            return ones
        return torch.where(distances > bound, bound / distances, ones)

    def fold(self, values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """[n, *shape] float64 values, NaN where client i does not hold a coordinate, and [n] weights
        -> [*shape] float64: per coordinate, the rule over the clients holding it (NaN where none does;
        a mean's weights must be > 0 for at least one holder)."""
        held = ~values.isnan()
        if self.rule == "mean":
            w = weights.view(-1, *[1] * (values.dim() - 1)) * held
            total = (values.nan_to_num(0.0) * w).sum(0)
            return torch.where(w.sum(0) > 0, total / w.sum(0), torch.full_like(total, math.nan))
        # Order statistics: sort (NaN sorts last), then average the ranks in a window of each coordinate's
        # k holders: [t, k - t) for trimmed-mean, the one or two middle ranks for the median.
        ranked = values.sort(0).values
        k = held.sum(0)
        if self.rule == "median":
            low, high = (k - 1).div(2, rounding_mode="floor"), k.div(2, rounding_mode="floor") + 1
        else:
            low = (self.trim * k).floor().long()
            high = k - low
        rank = torch.arange(len(values)).view(-1, *[1] * (values.dim() - 1))
        window = (rank >= low) & (rank < high) & (rank < k)
        count = window.sum(0)
        total = torch.where(window, ranked.nan_to_num(0.0), 0.0).sum(0)
        return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, math.nan))

    def describe(self) -> str:
        if self.trust:
            return "fltrust:labels" if self.labels else "fltrust"
        rule = f"trimmed-mean:{self.trim:g}" if self.rule == "trimmed-mean" else self.rule
        return rule if self.clip is None else f"norm-clip:{self.clip:g}+{rule}"


def fold_states(reference: Mapping[str, torch.Tensor], updates: Sequence[Mapping[str, torch.Tensor]],
                weights: Sequence[float], aggregation: Aggregation,
                index: Sequence[Mapping[str, Index]] | None = None) -> dict[str, torch.Tensor]:
    """`reference` (the current global state) with each tensor some update holds replaced by the fold of
    the updates holding it; what no update holds keeps its value. Returns every name of `reference`.

    updates[i][name] is client i's tensor for `name`: the whole global tensor, or, when `index` gives
    index[i][name], the coordinates that index places into it (a width-scaled submodel; kept channel
    indices are unique). Clipping measures each update's root-mean-square movement over the float
    coordinates it holds, so a client holding a deeper or wider submodel (DepthFL, HeteroFL) is not
    clipped for holding more; where all hold the whole model this is the distance up to one factor.
    Integer tensors (BatchNorm's batch counter) take the maximum over holders. Float results are cast
    back to the reference's dtype. An update of weight 0 holds nothing. With fltrust the weights are
    trust scores and the rule is the mean: their weighted mean (`server_app.trust`).
    Shapes: those of `reference`."""
    index = index or [{} for _ in updates]

    reference64: dict[str, torch.Tensor] = {}  # each reference tensor in float64, made once

    def held_reference(i: int, name: str) -> torch.Tensor:
        if name not in reference64:
            reference64[name] = reference[name].double()
        ref = reference64[name]
        return ref[index[i][name]] if name in index[i] else ref

    def rms_movement(i: int) -> float:  # per held coordinate: clients holding more of the model compare fairly
        moved = [(t.double() - held_reference(i, name)) for name, t in updates[i].items()
                 if t.is_floating_point() and name in reference]
        count = sum(m.numel() for m in moved)
        return math.sqrt(sum(float(m.square().sum()) for m in moved) / count) if count else 0.0

    # Movements are measured only when they are clipped: a plain rule folds the updates as sent.
    scales = (aggregation.clip_scales(torch.tensor([rms_movement(i) for i in range(len(updates))],
                                                   dtype=torch.float64))
              if aggregation.clip is not None else torch.ones(len(updates), dtype=torch.float64))
    out = dict(reference)
    for name, ref in reference.items():
        holders = [i for i, u in enumerate(updates) if name in u and weights[i] > 0]
        if not holders:
            continue
        if not ref.is_floating_point():
            out[name] = torch.stack([updates[i][name].to(ref.dtype).expand_as(ref) for i in holders]).max(0).values
            continue
        stack = torch.full((len(holders), *ref.shape), math.nan, dtype=torch.float64)
        for row, i in enumerate(holders):
            moved = updates[i][name].double()
            if scales[i] < 1:
                base = held_reference(i, name)
                moved = base + scales[i] * (moved - base)
            if name in index[i]:
                stack[row][index[i][name]] = moved
            else:
                stack[row] = moved
        folded = aggregation.fold(stack, torch.tensor([float(weights[i]) for i in holders], dtype=torch.float64))
        folded = torch.where(folded.isnan(), ref.double(), folded)
        if name.endswith("running_var"):  # a variance is >= 0; a negative one (only an attacker's update
            folded = folded.clamp_min(0.0)  # makes one) turns every output of its BatchNorm NaN
        out[name] = folded.to(ref.dtype)
    return out


def fold_logits(logits: Sequence[torch.Tensor], weights: Sequence[float], aggregation: Aggregation) -> torch.Tensor:
    """Clients' [P, C] logits on the public slice -> the ensemble's [P, C] float32 logits.

    The mean is REFT's example-weighted average of logits. Each client's row is first taken as log
    probabilities (log-softmax: a shift softmax ignores, so the mean's teacher is unchanged); median and
    trimmed mean then fold each coordinate over clients. With clipping, log probabilities are floored at
    LOG_ODDS_FLOOR: a client may claim odds of at most 10^4 : 1 between two classes, so one client moves an
    example's teacher logit by at most its weight share x 9.2 nats, while an honest client, whose log
    probabilities stay above the floor, is folded exactly as the mean folds it (clipping logit norms to
    the median client's instead cost REFT 5 points of clean accuracy, and folding probabilities 6: weak
    submodels' near-uniform rows diluted the confident ones; benchmarks/results/attacks.txt). With
    fltrust, `weights` are `label_trust` scores and the floored rows fold by their weighted mean."""
    stack = torch.stack([t.double() for t in logits]).log_softmax(-1)  # [n, P, C]
    if aggregation.clip is not None or aggregation.trust:
        stack = stack.clamp_min(LOG_ODDS_FLOOR)
    return aggregation.fold(stack, torch.tensor([float(w) for w in weights], dtype=torch.float64)).float()


def trust_normalised(start: Mapping[str, torch.Tensor], update: Mapping[str, torch.Tensor],
                     root: Mapping[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    """FLTrust's score and normalisation of one update (Cao et al., NDSS 2021, Alg. 1, lines 8-10).

    `start`: the weights the client's job started from; `update`: what it sent; `root`: what the
    server's run of the same job on its root dataset ended at (all keyed as `update`; integer tensors
    are kept as sent). With movements g = update - start and g0 = root - start over the learned float
    tensors: trust = max(0, cos(g, g0)), and the update returned is start + (|g0| / |g|) g, so no client
    moves the model further than the server's own step did. BatchNorm statistics (`running_mean`,
    `running_var`) are left out of the cosine — every client moves them from their initial values the
    same way, which would make any update look aligned — and their movement is bounded by the root's
    on its own, never scaled up: statistics a client measured close to the global ones, scaled up to a
    root whose 100 images differ more, blew up a FedAvg run on MNIST (0.96 -> 0.18 in one round).
    A movement or root movement of zero gives trust 0.

    Returns (trust in [0, 1], the normalised update, each tensor in its own dtype)."""
    floats = [k for k, t in update.items() if t.is_floating_point()]
    learned = [k for k in floats if not k.endswith(STATISTICS)]
    measured = [k for k in floats if k.endswith(STATISTICS)]
    g = {k: update[k].double() - start[k].double() for k in floats}
    g0 = {k: root[k].double() - start[k].double() for k in floats}
    trust, ratio = max(0.0, _cosine(g, g0, learned)), _ratio(g, g0, learned)
    if ratio is None:  # nothing learned moved (or the root did not): trusted with nothing
        return 0.0, dict(update)
    # Statistics are measured, not stepped: bounded by the root's movement, never scaled up.
    size, size0 = _norm(g, measured), _norm(g0, measured)
    bound = min(1.0, size0 / size) if 0 < size < math.inf else 0.0
    scaled = dict(update)
    scaled |= {k: (start[k].double() + ratio * g[k]).to(update[k].dtype) for k in learned}
    scaled |= {k: (start[k].double() + bound * g[k]).to(update[k].dtype) for k in measured}
    return trust, scaled


def _norm(moves: Mapping[str, torch.Tensor], names: Sequence[str]) -> float:
    return math.sqrt(sum(float(moves[k].square().sum()) for k in names))


def _cosine(g: Mapping[str, torch.Tensor], g0: Mapping[str, torch.Tensor], names: Sequence[str]) -> float:
    """cos(g, g0) over `names` in [-1, 1]; 0 when either movement is zero or |g| is not finite."""
    size, size0 = _norm(g, names), _norm(g0, names)
    if size == 0 or size0 == 0 or not math.isfinite(size):
        return 0.0
    return max(-1.0, min(1.0, sum(float((g[k] * g0[k]).sum()) for k in names) / (size * size0)))


def _ratio(g: Mapping[str, torch.Tensor], g0: Mapping[str, torch.Tensor], names: Sequence[str]) -> float | None:
    """|g0| / |g| over `names`; None when either movement is zero or |g| is not finite."""
    size, size0 = _norm(g, names), _norm(g0, names)
    return size0 / size if size and size0 and math.isfinite(size) else None


def label_trust(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """FLTrust's score for a reply of predictions on the root dataset itself (REFT's [P, C] logits on
    the public slice, whose [P] labels the server holds): max(0, cos) between the client's log
    probabilities, floored at LOG_ODDS_FLOOR, and the one-hot labels, both centred per row (a shift
    softmax ignores). Better than chance on the labels scores > 0; a client that puts its mass on
    wrong classes (flipped labels, adversarial logits) scores 0. Returns a trust in [0, 1]."""
    log_p = logits.double().log_softmax(-1).clamp_min(LOG_ODDS_FLOOR)
    log_p = log_p - log_p.mean(-1, keepdim=True)
    target = torch.nn.functional.one_hot(labels.long(), logits.shape[-1]).double()
    target = target - target.mean(-1, keepdim=True)
    norm = float(log_p.norm() * target.norm())
    return max(0.0, min(1.0, float((log_p * target).sum()) / norm)) if norm > 0 else 0.0


LABEL_CHECK_Z = 2.0  # fltrust:labels refuses a fall of the labels' probability beyond this many standard errors


def label_probability_change(before: torch.Tensor, after: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """How a step moved a model's predictions on a labelled set: (mean, standard error) over the P
    examples of the change in the probability the model gives each example's label, from [P, C] logits
    `before` to `after`, labels [P]. Each example's change lies in [-1, 1], so no one example dominates.
    fltrust:labels refuses an update whose mean is below -LABEL_CHECK_Z standard errors (evaluated one
    local step along it, `server_app.trust.one_local_step`). Measured (MNIST, 10 x 300 images, seed 0,
    8 rounds; mean / standard error): two label flippers -6 to -40 from round 2 on (near 0 in round 1,
    before the model has learned anything to unlearn); honest clients of FedAvg, HeteroFL and ProFL
    beside them and ExclusiveFL's clean run -6.4 to +35, below -2 once in 206 updates (FedAvg's clean
    run: 3 of 80). A cosine between log-probability changes and the one-hot labels was tried first: near
    convergence it follows the wrong classes' large log-probability swings, and it refused every honest
    FedAvg update from round 5 on.
    (0, 0) for an empty set."""
    if len(labels) == 0:
        return 0.0, 0.0
    index = labels.long().view(-1, 1)
    change = (after.double().softmax(-1).gather(1, index) - before.double().softmax(-1).gather(1, index)).view(-1)
    error = float(change.std()) / math.sqrt(len(change)) if len(change) > 1 else 0.0
    return float(change.mean()), error
