"""The benchmark's table: each figure beside its target from the issue."""

from __future__ import annotations

GIB = 1 << 30
HEADER = ("measure", "mode", "raw", "glmrepl", "result", "target", "")


def table(results: dict) -> str:
    rows = [HEADER]
    for label, figures in results["modes"].items():
        rows += mode_rows(label, figures)
    if "startup" in results:
        rows += startup_rows(results["startup"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def mode_rows(label: str, figures: dict) -> list[tuple]:
    gen = figures["generation"]
    if "load" not in figures:  # --quick: generation only
        return generation_rows(label, gen)
    load, memory = figures["load"], figures["memory"]
    raw, ours, roof = gen["raw"], gen["glmrepl"], gen["roof"]
    decode_ratio = ours["decode_tokens_per_s"] / raw["decode_tokens_per_s"]
    ttft_overhead = ours["first_token_s"] / raw["first_token_s"] - 1
    load_ratio = load["glmrepl_s"] / load["raw_s"]
    swap_ratio = memory["after_swaps_bytes"] / memory["after_one_load_bytes"]
    best_decode = ours["best_decode_tokens_per_s"] / raw["best_decode_tokens_per_s"]
    best_ttft = ours["best_first_token_s"] / raw["best_first_token_s"] - 1
    ceiling = roof["ceiling_tokens_per_s"]
    switch = figures["switch"]
    switch_ratio = switch["switch_s"] / switch["fresh_load_s"]
    return [
        (
            "decode tok/s",
            label,
            f"{raw['decode_tokens_per_s']:.2f}",
            f"{ours['decode_tokens_per_s']:.2f}",
            f"ratio {decode_ratio:.3f} (best {best_decode:.3f}; {gen['path']})",
            ">= 2.0",
            verdict(decode_ratio >= 2.0),
        ),
        (
            "first token s",
            label,
            f"{raw['first_token_s']:.3f}",
            f"{ours['first_token_s']:.3f}",
            f"overhead {ttft_overhead:+.1%} (best {best_ttft:+.1%})",
            "<= 5%",
            verdict(ttft_overhead <= 0.05),
        ),
        generation_rows(label, gen)[2],  # first token of a 1024-token prompt
        (
            "load s",
            label,
            f"{load['raw_s']:.2f}",
            f"{load['glmrepl_s']:.2f}",
            f"ratio {load_ratio:.3f}",
            "<= 1.05",
            verdict(load_ratio <= 1.05),
        ),
        (
            "/device switch s (vs fresh load)",
            label,
            f"{switch['fresh_load_s']:.2f}",
            f"{switch['switch_s']:.2f}",
            f"ratio {switch_ratio:.3f} ({switch['switch_to']})",
            "<= 0.5",
            verdict(switch_ratio <= 0.5),
        ),
        (
            "RSS GiB 1 load / 10 swaps",
            label,
            "",
            f"{memory['after_one_load_bytes'] / GIB:.2f} / {memory['after_swaps_bytes'] / GIB:.2f}",
            f"ratio {swap_ratio:.3f}",
            "<= 1.05",
            verdict(swap_ratio <= 1.05),
        ),
        (
            "roof: share of bw/bytes",
            label,
            f"{raw['decode_tokens_per_s'] / ceiling:.0%}",
            f"{ours['decode_tokens_per_s'] / ceiling:.0%}",
            f"{roof['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s / {roof['weight_bytes_per_token'] / 1e9:.2f} GB"
            f" = {ceiling:.1f} tok/s",
            "",
            "",
        ),
    ]


def generation_rows(label: str, gen: dict) -> list[tuple]:
    raw, ours = gen["raw"], gen["glmrepl"]
    decode_ratio = ours["decode_tokens_per_s"] / raw["decode_tokens_per_s"]
    long = gen["first_token_s_1024"]
    rows = [
        (
            "decode tok/s",
            label,
            f"{raw['decode_tokens_per_s']:.2f}",
            f"{ours['decode_tokens_per_s']:.2f}",
            f"ratio {decode_ratio:.3f} (path: {gen['path']})",
            ">= 2.0",
            verdict(decode_ratio >= 2.0),
        )
    ]
    for name, pair in (
        ("first token s (64)", (raw["first_token_s"], ours["first_token_s"])),
        ("first token s (1024)", (long["raw"], long["glmrepl"])),
    ):
        overhead = pair[1] / pair[0] - 1
        rows.append(
            (
                name,
                label,
                f"{pair[0]:.3f}",
                f"{pair[1]:.3f}",
                f"overhead {overhead:+.1%}",
                "<= 5%",
                verdict(overhead <= 0.05),
            )
        )
    return rows


def startup_rows(startup: dict) -> list[tuple]:
    prompt = startup["first_prompt_s"]
    return [
        ("launch to first prompt s", "", "", f"{prompt:.3f}", "model still loading", "<= 0.3", verdict(prompt <= 0.3)),
        ("glmrepl --version s", "", "", f"{startup['version_s']:.3f}", "", "", ""),
    ]


def verdict(met: bool) -> str:
    return "ok" if met else "MISS"
