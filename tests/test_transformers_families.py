"""Transformers as the installed ``transformers`` writes them (random weights, small configs of
our own): attention found from the trace, every returned group exact, coverage of the layers,
a LLaMA-architecture model pruned to 2× MACs that generates the tokens its masked twin does."""
import copy
import re

import pytest
import torch

import etp_graph as eg
from etp_graph.testing import assert_prune_equivalent

T = pytest.importorskip("transformers")


def _build(name):
    torch.manual_seed(0)
    small = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4)
    if name == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32,
                                              bos_token_id=0, eos_token_id=0)), "lm_head", 4
    if name == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(num_key_value_heads=2, vocab_size=100, **small)), "lm_head", 2
    if name == "qwen2":
        return T.Qwen2ForCausalLM(T.Qwen2Config(num_key_value_heads=2, vocab_size=100, **small)), "lm_head", 2
    if name == "llama-mqa":   # one key/value head: the unit is a query head
        return T.LlamaForCausalLM(T.LlamaConfig(num_key_value_heads=1, vocab_size=100, **small)), "lm_head", 4
    if name == "falcon-mqa":  # a fused projection of 4 query heads, one key and one value head
        return T.FalconForCausalLM(T.FalconConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                                                  num_attention_heads=4, multi_query=True, alibi=False,
                                                  new_decoder_architecture=False)), "lm_head", 4
    if name == "roberta":
        return T.RobertaForSequenceClassification(T.RobertaConfig(vocab_size=100, **small)), "classifier.out_proj", 4
    if name == "distilbert":
        return T.DistilBertForSequenceClassification(T.DistilBertConfig(n_layers=2, dim=64, hidden_dim=128,
                                                                        n_heads=4, vocab_size=100)), "classifier", 4
    if name == "vit":
        return T.ViTForImageClassification(T.ViTConfig(image_size=32, patch_size=8, **small)), "classifier", 4
    raise KeyError(name)


def _inputs(name):
    g = torch.Generator().manual_seed(1)
    if name == "vit":
        return {"pixel_values": torch.randn(2, 3, 32, 32, generator=g)}
    return {"input_ids": torch.randint(0, 100, (2, 8), generator=g)}


FAMILIES = ["gpt2", "llama", "qwen2", "llama-mqa", "falcon-mqa", "roberta", "distilbert", "vit"]


@pytest.mark.parametrize("name", FAMILIES)
def test_attention_heads_found_and_every_group_exact(name):
    model, head, units = _build(name)
    model.eval()
    x, head = _inputs(name), model.get_submodule(head)
    graph = eg.trace(model, x, ignored_layers=[head])
    assert not graph.skipped, graph.skipped
    att = [g for g in graph.groups if "attention" in g.ops]
    assert len(att) == 2 and all(g.size == units for g in att)   # one per layer: heads (kv heads for GQA)
    # 95 %+ of the Linear / Conv1D layers outside the head have their outputs in a group
    layers = [n for n, m in model.named_modules() if type(m).__name__ in ("Linear", "Conv1D") and m is not head]
    rows = {i.owner for g in graph.groups for i in g.items
            if i.attr == "weight" and i.dim == (1 if type(model.get_submodule(i.owner)).__name__ == "Conv1D" else 0)}
    if name == "llama-mqa":   # the one key/value head stays: k_proj and v_proj keep their outputs
        assert set(layers) - rows == {f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "kv"}
    else:
        assert sum(n in rows for n in layers) >= 0.95 * len(layers), sorted(set(layers) - rows)
    checks = assert_prune_equivalent(model, x, ignored_layers=[head])
    assert {c.root for c in checks if c.checked == "values"} >= {g.root for g in att}


@pytest.mark.parametrize("name", ["gpt2", "vit", "distilbert"])
def test_head_dims_where_the_forward_allows_them(name):
    model, head, _ = _build(name)
    model.eval()
    x, head = _inputs(name), model.get_submodule(head)
    graph = eg.trace(model, x, ignored_layers=[head], attention_units="head_dims")
    att = [g for g in graph.groups if "attention" in g.ops]
    assert len(att) == 2 and all(g.size == 16 for g in att), graph.skipped
    assert_prune_equivalent(model, x, ignored_layers=[head], attention_units="head_dims")


def test_query_heads_of_grouped_query_attention_prune_and_round_trip(tmp_path):
    """``attention_units="query_heads"`` on LLaMA with 4 query heads over 2 key/value heads: a
    unit is one query head of each key/value head; the keys and values stay. Cut uniformly, the
    config's ``num_attention_heads`` follows and ``num_key_value_heads`` does not."""
    model, head, _ = _build("llama")
    model.eval()
    x = _inputs("llama")
    graph = eg.trace(model, x, ignored_layers=[model.lm_head], attention_units="query_heads")
    att = [g for g in graph.groups if "attention" in g.ops]
    assert not graph.skipped and [g.size for g in att] == [2, 2]
    assert not [i for g in att for i in g.items if i.owner.endswith(("k_proj", "v_proj"))]
    checks = assert_prune_equivalent(model, x, ignored_layers=[model.lm_head], attention_units="query_heads")
    assert {c.root for c in checks if c.checked == "values"} >= {g.root for g in att}
    keep = lambda g: "attention" in g.ops   # noqa: E731
    pruner = eg.ETPPruner(model, x, ignored_layers=[model.lm_head], pruning_ratio=0.5, uniform=True,
                          attention_units="query_heads", group_filter=keep)
    plan, masked = pruner.plan(), copy.deepcopy(model)
    assert plan and all(len(units) == 1 for units in plan.values())   # one query head per key/value head
    for g in pruner.graph.groups:
        if plan.get(g.id):
            g.zero_(plan[g.id], model=masked)
    report = pruner.step(plan=plan)
    assert report.config_note is None, report.config_note
    # decoding reads the query heads per key/value head on its own path (one query token)
    prompt, kw = x["input_ids"][:1, :4], dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, **kw), masked.generate(prompt, **kw))
    layer = model.model.layers[0].self_attn
    assert (layer.q_proj.out_features, layer.k_proj.out_features, layer.num_key_value_groups) == (32, 32, 1)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (2, 2)
    model.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(model(**x).logits, again(**x).logits, atol=1e-5)


def test_rotary_models_refuse_head_dims_with_the_reason():
    model, head, _ = _build("llama")
    graph = eg.trace(model.eval(), _inputs("llama"), ignored_layers=[model.lm_head], attention_units="head_dims")
    reasons = [s.reason for s in graph.skipped if "self_attn" in s.root]
    assert len(reasons) == 2 and all("rotary" in r for r in reasons)


def test_gpt2_split_size_follows_the_cut():
    model, _, _ = _build("gpt2")
    model.eval()
    graph = eg.trace(model, _inputs("gpt2"), ignored_layers=[model.lm_head])
    att = next(g for g in graph.groups if g.root == "transformer.h.0.attn.c_attn")
    assert [(c.owner, c.attr, c.per_unit) for c in att.counters] == [("transformer.h.0.attn", "split_size", 16)]
    att.prune([1, 3])
    a = model.transformer.h[0].attn
    assert (a.split_size, a.c_attn.nf, a.c_attn.weight.shape, a.c_proj.weight.shape) == (32, 96, (64, 96), (32, 64))
    assert model(**_inputs("gpt2")).logits.shape == (2, 8, 100)
    # the tied input and output embeddings stay one tensor through a cut of the hidden width
    width = next(g for g in graph.groups if g.root == "transformer.wte")
    width.prune([0, 5])
    assert model.lm_head.weight is model.transformer.wte.weight and model.lm_head.weight.shape == (100, 62)


def test_llama_pruned_to_2x_generates_what_its_masked_twin_generates():
    model, _, _ = _build("llama")
    model.eval()
    x = _inputs("llama")
    # the hidden width passes RMSNorms (masking differs from removal there): keep it, cut heads and MLPs
    ignored = [model.lm_head, model.model.embed_tokens]
    pruner = eg.ETPPruner(model, x, ignored_layers=ignored, target_speedup=2.0)
    (plan,) = pruner.path([2.0])
    for g in pruner.graph.groups:   # a key/value head (with its query heads) goes in every layer too
        if "attention" in g.ops and not plan.removed.get(g.id):
            plan.removed[g.id] = [0]
    masked = copy.deepcopy(model)
    for g in pruner.graph.groups:
        drop = plan.removed.get(g.id, [])
        if drop:
            g.zero_(drop, model=masked)
    report = pruner.step(plan=plan)
    assert report.speedup >= 1.95
    assert [a.k_proj.out_features for a in (layer.self_attn for layer in model.model.layers)] == [16, 16]
    prompt = x["input_ids"][:1, :4]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, **kw), masked.generate(prompt, **kw))


@pytest.mark.parametrize("name", ["llama", "roberta", "gpt2"])
def test_uniform_prune_keeps_a_hugging_face_model_that_round_trips(name, tmp_path):
    model, head, _ = _build(name)
    model.eval()
    x, head = _inputs(name), model.get_submodule(head)
    # LLaMA's config states its head size: heads, key/value heads and FFN round-trip (its width
    # must stay a multiple of the head count, which its config validates: the width is kept).
    # RoBERTa's and GPT-2's derive the head size from width / heads: only their FFN can change.
    keep = (lambda g: "embed" not in g.root) if name == "llama" else (lambda g: "attention" not in g.ops
                                                                      and g.size != 64)
    pruner = eg.ETPPruner(model, x, ignored_layers=[head], target_speedup=1.6, uniform=True, group_filter=keep)
    before = model.config.to_dict()
    (plan,) = pruner.path([1.6])
    if name == "llama":   # one key/value head (and its 2 query heads) in every layer as well
        for g in pruner.graph.groups:
            if "attention" in g.ops:
                plan.removed[g.id] = sorted(set(plan.removed.get(g.id, [])) | {1})
    report = pruner.step(plan=plan)
    assert report.config_note is None, report.config_note
    kinds = {}
    for root, n in report.units_kept.items():             # every layer of a kind kept as many units
        kinds.setdefault(re.sub(r"\d+", "*", root), set()).add(n)
    assert all(len(v) == 1 for v in kinds.values()), kinds
    changed = {k: (before[k], v) for k, v in model.config.to_dict().items() if before.get(k) != v}
    fields = {"llama": {"num_attention_heads", "num_key_value_heads", "intermediate_size"},
              "roberta": {"intermediate_size"}, "gpt2": {"n_inner"}}[name]
    assert fields <= set(changed) <= fields | {"head_dim"}, changed
    model.save_pretrained(tmp_path)
    again = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        a, b = model(**x).logits, again(**x).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_uneven_layers_leave_the_config_and_say_why():
    model, _, _ = _build("llama")
    model.eval()
    x = _inputs("llama")
    pruner = eg.ETPPruner(model, x, ignored_layers=[model.lm_head], pruning_ratio=0.5)
    first_ffn = next(g for g in pruner.graph.groups if g.root.endswith("gate_proj"))
    before = model.config.to_dict()
    report = pruner.step(plan={first_ffn.id: list(range(64))})     # one layer's FFN only
    assert model.config.to_dict() == before
    assert "uniform=True" in report.config_note and "save_pruned" in report.config_note


def _t5():
    torch.manual_seed(0)
    cfg = T.T5Config(num_layers=3, num_decoder_layers=2, d_model=48, d_ff=96, num_heads=4, d_kv=12, vocab_size=90,
                     decoder_start_token_id=0)
    g = torch.Generator().manual_seed(2)
    x = {"input_ids": torch.randint(0, 90, (2, 7), generator=g), "decoder_input_ids": torch.randint(0, 90, (2, 5), generator=g)}
    return T.T5ForConditionalGeneration(cfg).eval(), x


def test_t5_tied_width_and_cross_attention_prune_when_only_the_logits_must_stay():
    model, x = _t5()
    # by default the encoder's last hidden state is an output whose width must stay
    g = eg.trace(model, x, ignored_layers=[model.lm_head])
    reason = [s.reason for s in g.skipped if s.root == "encoder.embed_tokens"][0]
    assert reason.startswith("its channels reach a model output")
    assert "outputs=['logits']" in reason   # the message names the fix used below
    g = eg.trace(model, x, ignored_layers=[model.lm_head], outputs=["logits"])
    assert not g.skipped
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    rows = {i.owner for gr in g.groups for i in gr.items if i.attr == "weight" and i.dim == 0}
    assert set(linears) <= rows
    width = next(gr for gr in g.groups if gr.root == "encoder.embed_tokens")
    assert width.size == 48 and {"shared", "encoder.embed_tokens", "decoder.embed_tokens"} <= set(width.modules)
    # the cross-attentions pass a zero bias of n_heads from layer to layer: one group for both
    cross = next(gr for gr in g.groups if "EncDecAttention" in gr.root)
    assert cross.size == 4 and {f"decoder.block.{b}.layer.1.EncDecAttention.q" for b in (0, 1)} <= set(cross.modules)
    assert_prune_equivalent(model, x, ignored_layers=[model.lm_head], outputs=["logits"], check_macs=False)


def test_t5_pruned_keeps_its_ties_and_runs():
    model, x = _t5()
    pruner = eg.ETPPruner(model, x, ignored_layers=[model.lm_head], pruning_ratio=0.25, outputs=["logits"])
    report = pruner.step()
    assert report.macs_after < report.macs_before
    assert model.shared.weight is model.encoder.embed_tokens.weight is model.decoder.embed_tokens.weight
    assert model.shared.weight.shape == (90, 36) and model.lm_head.weight.shape == (90, 36)
    assert model(**x).logits.shape == (2, 5, 90)
    with pytest.raises(KeyError, match="no 'scores'"):
        eg.trace(model, x, ignored_layers=[model.lm_head], outputs=["scores"])


def _bert():
    torch.manual_seed(0)
    return T.BertForSequenceClassification(T.BertConfig(vocab_size=100, num_hidden_layers=2, hidden_size=64,
                                                        intermediate_size=128, num_attention_heads=4)), "classifier", 4


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_uneven_prune_round_trips_through_save_pruned(name, tmp_path):
    build = _bert if name == "bert" else lambda: _build(name)
    model, head, _ = build()
    model.eval()
    x = _inputs(name)
    graph = eg.trace(model, x, ignored_layers=[model.get_submodule(head)])
    attention = [g for g in graph.groups if g.heads]
    ffn = [g for g in graph.groups if not g.heads and g.exact and g.size > 64]   # wider than the hidden width
    attention[0].prune([0])          # one head less in the first layer only
    ffn[-1].prune(list(range(10)))   # ten FFN units less in the last layer only
    widths = [g.size for g in attention + ffn]
    assert widths[0] == attention[1].size - 1 and ffn[-1].size == ffn[0].size - 10
    eg.save_pruned(model, tmp_path / "m.pt")
    fresh = eg.load_pruned(lambda: build()[0], tmp_path / "m.pt").eval()
    with torch.no_grad():
        assert torch.equal(model(**x).logits, fresh(**x).logits)
