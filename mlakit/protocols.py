"""All quality protocols of one model in one call: wikitext2-smollm2-v1 (512-token ppl),
longctx-smollm2-v1 (long-window ppl and passkey-v1) and ood-smollm2-v1 (text that is not
wikitext). ``mlakit eval --protocol``, ``mlakit demo`` and the device scripts use this."""

from __future__ import annotations

from typing import Any

from mlakit.errors import MlakitError

CHOICES = ("wikitext2", "longctx", "ood", "all")


def selected(choice: str) -> tuple[str, ...]:
    """The protocol groups a ``--protocol`` choice runs, in order."""
    if choice not in CHOICES:
        raise MlakitError(f"--protocol takes one of {', '.join(CHOICES)}, got {choice!r}")
    return ("wikitext2", "longctx", "ood") if choice == "all" else (choice,)


def evaluate_protocols(loaded, choice: str = "all", passkey_lengths=None, passkey_trials: int | None = None,
                       progress: bool = True, options=None) -> dict[str, Any]:
    """``{protocol name: result}`` (result objects with ``to_dict()``), in the order run.
    ``passkey_lengths`` / ``passkey_trials``: fewer than the protocol's (then the result
    says so in its lengths and trials; the protocol's figures need all). ``options``
    (mlakit.options.ForwardOptions: a cache format, sparse attention) runs every forward and
    the passkey's generation."""
    from mlakit import evaluate as ev
    from mlakit import ood, passkey

    results: dict[str, Any] = {}
    for group in selected(choice):
        if group == "wikitext2":
            results[ev.PROTOCOL] = ev.evaluate(loaded, progress=progress, options=options)
        elif group == "longctx":
            results[ev.LONG_PROTOCOL] = ev.evaluate_long_window(loaded, progress=progress, options=options)
            results[passkey.PROTOCOL] = passkey.evaluate_passkey(
                loaded, lengths=passkey_lengths, trials=passkey_trials, progress=progress, options=options)
        else:
            results[ood.PROTOCOL] = ood.evaluate_ood(loaded, progress=progress, options=options)
    return results


def format_results(results: dict[str, Any]) -> list[str]:
    """One line per protocol, each naming its protocol."""
    from mlakit import evaluate as ev
    from mlakit import ood, passkey

    formatters = {ev.PROTOCOL: ev.format_result, ev.LONG_PROTOCOL: ev.format_long_window,
                  passkey.PROTOCOL: passkey.format_passkey, ood.PROTOCOL: ood.format_ood}
    return [formatters[name](result) for name, result in results.items()]


def results_dict(model: str, results: dict[str, Any]) -> dict[str, Any]:
    """The JSON form: ``{"model": ..., "results": {protocol name: fields}}``."""
    return {"model": model, "results": {name: result.to_dict() for name, result in results.items()}}


def summary_row(results: dict[str, Any]) -> dict[str, float | None]:
    """The headline figures of a model (None where not measured): ``ppl_512``,
    ``ppl_long``, ``passkey_<N>`` per length, ``ppl_ood_<text>`` per text."""
    from mlakit import evaluate as ev
    from mlakit import ood, passkey

    row: dict[str, float | None] = {}
    if ev.PROTOCOL in results:
        row["ppl_512"] = results[ev.PROTOCOL].ppl
    if ev.LONG_PROTOCOL in results:
        row["ppl_long"] = results[ev.LONG_PROTOCOL].ppl
    if passkey.PROTOCOL in results:
        for r in results[passkey.PROTOCOL].lengths:
            row[f"passkey_{r.length_target}"] = r.share
    if ood.PROTOCOL in results:
        for name, t in results[ood.PROTOCOL].texts.items():
            row[f"ppl_ood_{name}"] = t["ppl"]
    return row
