"""TokenLoader's resume state: the fields `state_dict()` saves, and the checks a saved state passes
before it is resumed (each position field bounded, the same seed, windows, batch, filters and
shuffle), each refusal naming the field and the fix.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from activault.errors import ConfigError
from activault.reading.rcache import check_state
from activault.reading.window import STRATIFIED

# The state's `ramp` of a plain loader whose ramp draws its first window as the files arrive (a
# mixture's runs, and loaders before this one, saved True: windows of 1, 2, 4, ... files).
PROGRESSIVE = "first-window"

POSITION = ("epoch", "window", "offset")
LAST = 2**63 - 1


@dataclass(frozen=True)
class Settings:
    """What a saved state must agree with: the fields every TokenLoader state has."""

    seed: int
    window: int
    ramp: bool | str
    batch_tokens: int
    drop_nonfinite: bool
    token_filter: dict[str, Any]
    norm_limits: Any  # per hook (a mixture: per run and hook)
    split: dict[str, Any] | None

    def fields(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "window_files": self.window,
            "ramp": self.ramp,
            "batch_tokens": self.batch_tokens,
            "drop_nonfinite": self.drop_nonfinite,
            "token_filter": self.token_filter,
            "norm_limits": self.norm_limits,
            "split": self.split,
        }


def position_state(mine: Settings, epoch: int, window: int, offset: int) -> dict[str, Any]:
    """A plain loader's state: the next token's (epoch, window, offset) and the settings."""
    return {"epoch": epoch, "window": window, "offset": offset, **mine.fields(), "shuffle": STRATIFIED}


def mixture_state(
    mine: Settings, weights: Sequence[Any], batches: int, runs: Sequence[Sequence[int]]
) -> dict[str, Any]:
    """A mixture's state: the settings, the weights, the batches so far and each run's position
    (each run's windows stratified, as a plain loader's: mixing.py `Feed`)."""
    mix = {
        "weights": [str(w) for w in weights],  # exact fractions: the schedule depends on them
        "batches": batches,
        "runs": [list(p) for p in runs],
    }
    return {**mine.fields(), "shuffle": STRATIFIED, "mixture": mix}


def load_position(state: Any, mine: Settings, windows: Callable[[int], int]) -> tuple[int, int, int]:
    """(epoch, window, offset) of a plain loader's `state`; `windows(epoch)`: the epoch's windows.
    The offset's bound (the window's kept tokens) is checked once the window is read."""
    check_state(state, "TokenLoader", dict.fromkeys(POSITION, (0, None)))
    check_settings(state, mine)
    epoch = int(check_state(state, "TokenLoader", {"epoch": (0, LAST)})["epoch"])
    count = windows(epoch)
    check_state(state, "TokenLoader", {"window": (0, count)})
    # At the epoch's end (window == count) no token is left: only offset 0 can follow.
    check_state(state, "TokenLoader", {"offset": (0, 0 if int(state["window"]) == count else LAST)})
    _check_shuffle(state, bool(state["offset"]))
    return epoch, int(state["window"]), int(state["offset"])


def _check_shuffle(state: Mapping[str, Any], mid_window: bool) -> None:
    """A state saved mid-window by another shuffle than this loader's is refused (the rest of that
    window would repeat and skip tokens); at a window boundary any shuffle resumes exactly."""
    shuffle = state.get("shuffle", "torch-randperm")  # saved before the key existed
    if shuffle != STRATIFIED and mid_window:
        raise ConfigError(
            f"state was saved mid-window by a loader that shuffled with {shuffle!r}; this one uses "
            f"{STRATIFIED!r}, so the rest of that window would repeat and skip tokens: resume from a "
            "state saved at a window boundary (offset 0), or with the activault that saved it"
        )


def load_mixture(
    state: Any, mine: Settings, weights: Sequence[Any] | None, windows: Sequence[Callable[[int], int]]
) -> tuple[int, list[tuple[int, int, int]]]:
    """(batches so far, each run's (epoch, window, offset)) of a mixture's `state`; `windows[i](epoch)`:
    run i's windows in that epoch."""
    if not isinstance(state, Mapping) or not isinstance(state.get("mixture"), Mapping):
        raise ConfigError(
            "state was not saved by a mixture of runs (no 'mixture' field): resume it with a loader of "
            "the same URIs without weights="
        )
    if weights is None:
        raise ConfigError(
            "state was saved by a mixture of runs (weights=): make the loader with the same runs and "
            "weights to resume it"
        )
    check_settings(state, mine)
    mix, expected = state["mixture"], [str(w) for w in weights]
    if mix.get("weights") != expected:
        raise ConfigError(
            f"state was saved with weights {mix.get('weights')} (normalised), this loader has "
            f"{expected}: make the loader with the same runs and weights to resume it"
        )
    runs = mix.get("runs")
    if not isinstance(runs, Sequence) or len(runs) != len(windows):
        raise ConfigError(f"TokenLoader state: field 'mixture.runs' is {runs!r}, not one position per run")
    batches = int(check_state(mix, "TokenLoader mixture", {"batches": (0, LAST)})["batches"])
    positions = []
    for i, pos in enumerate(runs):
        named = dict(zip(POSITION, pos, strict=False)) if isinstance(pos, Sequence) else pos
        owner = f"TokenLoader mixture run {i}"
        epoch = int(check_state(named, owner, {"epoch": (0, LAST)})["epoch"])
        count = windows[i](epoch)
        window = int(check_state(named, owner, {"window": (0, count)})["window"])
        check_state(named, owner, {"offset": (0, 0 if window == count else LAST)})
        positions.append((epoch, window, int(named["offset"])))
    # A state of the uniform shuffle of each run's window ('numpy-pcg64'): resumable at window boundaries.
    _check_shuffle(state, any(offset for _, _, offset in positions))
    return batches, positions


def check_settings(state: Mapping[str, Any], mine: Settings) -> None:
    """The fields every TokenLoader state has: the same seed, windows, batch and filters."""
    for k in ("seed", "window_files", "batch_tokens"):
        if k not in state:
            raise ConfigError(f"not a TokenLoader state_dict: no {k}")
    for k in ("seed", "window_files", "ramp", "batch_tokens", "drop_nonfinite"):
        saved, value = state.get(k, False), mine.fields()[k]  # ramp, drop_nonfinite: absent from older states
        if k == "ramp" and saved is True and value == PROGRESSIVE:
            raise ConfigError(
                "state was saved by a loader whose ramp cut windows of 1, 2, 4, ... files; this one's ramp "
                "draws its first window's tokens as the files arrive, so the windows differ: resume it with "
                "the activault that saved it, or start this loader afresh (no load_state_dict)"
            )
        if saved != value:
            arg = "window" if k == "window_files" else k
            fix = True if saved == PROGRESSIVE else saved
            raise ConfigError(
                f"state was saved with {k}={saved}, this loader has {value}: "
                f"make the loader with {arg}={fix} to resume it"
            )
    _check_filters(state, mine)


def _check_filters(state: Mapping[str, Any], mine: Settings) -> None:
    """The same tokens kept as when `state` was saved (states saved before filters: unchecked)."""
    if state.get("split") != mine.split:  # states saved before splits had none
        raise ConfigError(
            f"state was saved with split {state.get('split')}, this loader has {mine.split}: make the loader "
            "with the same split, test_fraction and split_seed to resume it"
        )
    if "token_filter" not in state:
        return
    if state["token_filter"] != mine.token_filter:
        raise ConfigError(
            f"state was saved with token_filter={state['token_filter']}, this loader has {mine.token_filter}: "
            "make the loader with the same filters (token_filter, drop_positions_below, drop_nonfinite) to resume it"
        )
    limits = state.get("norm_limits", [])
    if limits != mine.norm_limits:
        raise ConfigError(
            f"state was saved with norm limits {limits} (max_norm_ratio x each hook's median norm), "
            f"this loader has {mine.norm_limits}: the run's statistics changed since (machines merged "
            "in), so resuming would drop other tokens than the saved loader did: start a new loader (no "
            "load_state_dict) to read with the new statistics"
        )
