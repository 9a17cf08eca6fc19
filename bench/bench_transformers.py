"""transformers models on our kernels vs transformers' own sdpa and eager attention (random weights, no downloads).

Tasks: BLIP VQA generate (BlipForQuestionAnswering patched by apply_mplug_kernels_to_blip; BLIP's text model has no
SDPA path in transformers, so its baseline is eager) and a BERT cross-attention training step (BertModel with
add_cross_attention, bidirectional self-attention, forward + backward) with attn_implementation = ours, sdpa, eager.
Every implementation of a task is timed interleaved by bench.common.measure on copies of one model.
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, Optional, Sequence

import torch

from bench.common import (Grids, Run, TimingPolicy, bench_dtype, benchmark_parser, default_device, paired_ratio,
                          parse_benchmark_args, write_results, measure)

# Shapes: BLIP base at 384 px (577 vision tokens) and BERT base attending to 577 vision tokens on a GPU.
GRIDS = Grids(
    quick=dict(hidden=64, heads=2, layers=1, image=32, patch=8, batch=2, text=6, vision=17, answer=3),
    gpu=dict(hidden=768, heads=12, layers=12, image=384, patch=16, batch=8, text=25, vision=577, answer=10),
    cpu=dict(hidden=768, heads=12, layers=2, image=224, patch=16, batch=2, text=25, vision=197, answer=5),
)


def blip_vqa_functions(shape, device, dtype, name) -> Dict[str, Callable[[], object]]:
    """{implementation: one VQA generate call}: ours (patched) and eager."""
    from transformers import BlipConfig, BlipForQuestionAnswering

    from mplug_kernels.integrations.transformers import apply_mplug_kernels_to_blip

    layers = dict(hidden_size=shape["hidden"], num_attention_heads=shape["heads"], num_hidden_layers=shape["layers"],
                  intermediate_size=4 * shape["hidden"])
    config = BlipConfig(text_config=dict(**layers, bos_token_id=1, eos_token_id=2, sep_token_id=2, pad_token_id=0),
                        vision_config=dict(**layers, image_size=shape["image"], patch_size=shape["patch"]))
    torch.manual_seed(0)
    eager = BlipForQuestionAnswering(config).eval().to(device=device, dtype=dtype)
    ours = apply_mplug_kernels_to_blip(copy.deepcopy(eager), name=name)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 1000, (shape["batch"], shape["text"]), generator=generator).to(device)
    pixels = torch.randn(shape["batch"], 3, shape["image"], shape["image"], generator=generator).to(device, dtype)
    tokens = dict(max_new_tokens=shape["answer"], min_new_tokens=shape["answer"])
    return {label: (lambda model=model: model.generate(input_ids=ids, pixel_values=pixels, **tokens))
            for label, model in (("ours", ours), ("eager", eager))}


def bert_train_functions(shape, device, dtype, name) -> Dict[str, Callable[[], object]]:
    """{implementation: one forward + backward of a BERT cross-attention encoder}: ours, sdpa and eager."""
    from transformers import BertConfig, BertModel

    config = BertConfig(hidden_size=shape["hidden"], num_attention_heads=shape["heads"],
                        num_hidden_layers=shape["layers"], intermediate_size=4 * shape["hidden"], is_decoder=True,
                        add_cross_attention=True, is_causal=False, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    master = BertModel(config, add_pooling_layer=False).train().to(device=device, dtype=dtype)
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(5, 1000, (shape["batch"], shape["text"]), generator=generator).to(device)
    vision = torch.randn(shape["batch"], shape["vision"], shape["hidden"], generator=generator).to(device, dtype)

    def step(model):
        model.zero_grad(set_to_none=True)
        out = model(ids, encoder_hidden_states=vision, use_cache=False).last_hidden_state
        out.float().square().mean().backward()

    functions = {}
    for label, implementation in (("ours", name), ("sdpa", "sdpa"), ("eager", "eager")):
        model = copy.deepcopy(master)
        model.set_attn_implementation(implementation)
        functions[label] = lambda model=model: step(model)
    return functions


TASKS = {"blip_vqa_generate": blip_vqa_functions, "bert_cross_attention_train_step": bert_train_functions}


def main(argv: Optional[Sequence[str]] = None):
    """Time every task, print a table and write transformers.json."""
    args = parse_benchmark_args(benchmark_parser("python -m bench.bench_transformers", __doc__), argv)
    from mplug_kernels.integrations.transformers import register

    device = default_device()
    dtype, shape = bench_dtype(device), GRIDS.select(device, args.quick)
    name = register("mplug_kernels_bench", backend="auto")
    policy = TimingPolicy.for_device(device, budget_s=args.budget)
    run, rows, ratios = Run(device, policy), [], []
    for task, build in TASKS.items():
        timings = measure(build(shape, device, dtype, name), device, policy)
        rows += [{"task": task, "implementation": label, "batch": shape["batch"], **timing.row()}
                 for label, timing in timings.items()]
        ratios += [{"task": task, "ratio": f"ours/{label}", **ratio.row()} for label in timings if label != "ours"
                   if (ratio := paired_ratio(timings["ours"], timings[label])) is not None]
    for row in rows:
        print(f"{row['task']:32} {row['implementation']:6} {row.get('ms_median', float('nan')):10.2f} ms "
              f"{row.get('attention_backends', row.get('error', ''))}")
    for ratio in ratios:
        print(f"{ratio['task']:32} {ratio['ratio']:11} {ratio['ratio_median']:.2f}x")
    path = write_results("transformers", run, rows, out_dir=args.json_dir, ratios=ratios, shape=shape,
                         dtype=str(dtype))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
