"""The FisherTune section of the model card that `save_pretrained` writes (README.md beside the adapter)."""

from __future__ import annotations

import os
from collections import defaultdict

from .layer import FisherTuneLayer

BEGIN, END = "<!-- fishertune:begin -->", "<!-- fishertune:end -->"


def card_section(peft_model) -> str | None:
    """Markdown describing every FisherTune adapter of `peft_model`, or None if it has none."""
    configs = {n: c for n, c in peft_model.peft_config.items() if str(getattr(c.peft_type, "value", c.peft_type)) == "FISHERTUNE"}
    if not configs:
        return None
    layers = [m for m in peft_model.modules() if isinstance(m, FisherTuneLayer)]
    lines = [BEGIN, "## FisherTune adapter", "",
             "Load it with `pip install peft-fishertune`, then `PeftModel.from_pretrained(base_model, path)` or "
             "`AutoPeftModel.from_pretrained(path)`: the package registers the `FISHERTUNE` peft type with PEFT when "
             "`peft` is imported (with PEFT_FISHERTUNE_NO_AUTOLOAD=1, `import peft_fishertune` first; without it "
             "PEFT raises `KeyError: 'FISHERTUNE'`).", ""]
    for name, config in configs.items():
        per_type: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # type -> [layers, elements, active]
        for m in layers:
            if name not in m.ft_values:
                continue
            kind = m.ft_key.rsplit(".", 1)[-1] or type(m.get_base_layer()).__name__
            row = per_type[f"{kind} ({type(m.get_base_layer()).__name__})"]
            row[0] += 1
            row[1] += m.weight_numel
            row[2] += m.num_active(name)
        total = sum(r[1] for r in per_type.values())
        active = sum(r[2] for r in per_type.values())
        lines += [
            f"### Adapter `{name}`",
            "",
            f"- base model: `{config.base_model_name_or_path}`",
            f"- target modules: `{config.target_modules}`" + (f", excluded: `{config.exclude_modules}`" if config.exclude_modules else ""),
            f"- modules trained fully (modules_to_save): `{config.modules_to_save}`",
            f"- δ_min = {config.delta_min}, δ_max = {config.delta_max}, schedule = {config.schedule}, scope = {config.scope}",
            f"- Fisher estimator: {config.fisher_estimator} (λ = {config.lambda_dr}, γ = {config.gamma}, τ = {config.tau})",
            f"- selected elements: {active:,} of {total:,} targeted ({100.0 * active / max(total, 1):.3f} %)",
            "",
            "| module type | layers | targeted elements | selected | % |",
            "|---|---:|---:|---:|---:|",
        ]
        for kind, (n, numel, k) in sorted(per_type.items()):
            lines.append(f"| {kind} | {n} | {numel:,} | {k:,} | {100.0 * k / max(numel, 1):.3f} |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def write_card_section(peft_model, output_dir: str) -> None:
    section = card_section(peft_model)
    path = os.path.join(output_dir, "README.md")
    if section is None or not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
