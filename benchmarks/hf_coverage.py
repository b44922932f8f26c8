"""Coverage of the installed ``transformers`` families: random weights, 2 layers, width 64.

    python -m benchmarks.hf_coverage [heads|query_heads|head_dims] [gpt2,llama,llama-mqa,falcon-mqa,qwen2,...]

Per model: groups and refusals of ``eg.trace`` (the task head ignored), how many Linear/Conv1D
layers outside the head have their output channels in a group, and ``assert_prune_equivalent``
on every group. The tests (``tests/test_transformers_families.py``) check the same families.
"""
from __future__ import annotations

import sys
import warnings

import torch


def build(name):
    import transformers as T
    torch.manual_seed(0)
    small = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4)
    ids = {"input_ids": torch.randint(0, 100, (2, 8))}
    if name == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32,
                                              bos_token_id=0, eos_token_id=0)), ids, "lm_head"
    if name == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(num_key_value_heads=2, vocab_size=100, **small)), ids, "lm_head"
    if name == "llama-mqa":
        return T.LlamaForCausalLM(T.LlamaConfig(num_key_value_heads=1, vocab_size=100, **small)), ids, "lm_head"
    if name == "falcon-mqa":
        return (T.FalconForCausalLM(T.FalconConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                                                   num_attention_heads=4, multi_query=True, alibi=False,
                                                   new_decoder_architecture=False)), ids, "lm_head")
    if name == "qwen2":
        return T.Qwen2ForCausalLM(T.Qwen2Config(num_key_value_heads=2, vocab_size=100, **small)), ids, "lm_head"
    if name == "bert":
        return T.BertForSequenceClassification(T.BertConfig(vocab_size=100, **small)), ids, "classifier"
    if name == "roberta":
        return (T.RobertaForSequenceClassification(T.RobertaConfig(vocab_size=100, **small)), ids,
                "classifier.out_proj")
    if name == "vit":
        return (T.ViTForImageClassification(T.ViTConfig(image_size=32, patch_size=8, **small)),
                {"pixel_values": torch.randn(2, 3, 32, 32)}, "classifier")
    if name == "t5":
        return (T.T5ForConditionalGeneration(T.T5Config(num_layers=2, d_model=64, d_ff=128, num_heads=4, d_kv=16,
                                                        vocab_size=100)),
                {**ids, "decoder_input_ids": torch.randint(0, 100, (2, 8))}, "lm_head")
    if name == "distilbert":
        return (T.DistilBertForSequenceClassification(T.DistilBertConfig(n_layers=2, dim=64, hidden_dim=128,
                                                                         n_heads=4, vocab_size=100)), ids,
                "classifier")
    raise KeyError(f"unknown family {name!r}")


def main(argv=None) -> int:
    import etp_graph as eg
    from etp_graph.testing import assert_prune_equivalent
    warnings.filterwarnings("ignore")
    argv = sys.argv[1:] if argv is None else argv
    kind = argv[0] if argv else "heads"
    names = (argv[1] if len(argv) > 1 else "gpt2,llama,qwen2,bert,roberta,vit,t5,distilbert").split(",")
    for name in names:
        model, x, head = build(name)
        model.eval()
        head = model.get_submodule(head)
        # T5 returns its encoder's last hidden state beside the logits: only the logits must keep their shape
        outputs = ["logits"] if name == "t5" else None
        g = eg.trace(model, x, ignored_layers=[head], attention_units=kind, outputs=outputs)
        layers = [n for n, m in model.named_modules() if type(m).__name__ in ("Linear", "Conv1D") and m is not head]
        rows = {i.owner for gr in g.groups for i in gr.items
                if i.attr == "weight" and i.dim == (1 if type(model.get_submodule(i.owner)).__name__ == "Conv1D" else 0)}
        print(f"{name} [{kind}]: {len(g.groups)} groups, {len(g.skipped)} skipped, outputs of "
              f"{sum(n in rows for n in layers)}/{len(layers)} Linear/Conv1D layers in a group")
        for s in g.skipped:
            print(f"   skipped {s.root}: {s.reason[:160]}")
        try:
            checks = assert_prune_equivalent(model, x, ignored_layers=[head], attention_units=kind, check_macs=False,
                                             outputs=outputs)
            print(f"   mask == prune on every group: {len(checks)} checks, {sum(c.checked == 'values' for c in checks)} "
                  "by value")
        except AssertionError as e:
            print(f"   FAILED {str(e)[:400]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
