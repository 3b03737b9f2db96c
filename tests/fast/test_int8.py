"""minippo.fast.int8 against bitsandbytes' own eval-mode Linear8bitLt: the forward bit for bit, the exact
input gradient bit for bit, the int8 one within its rounding; the input reuse never stale nor foreign."""

import threading

import bitsandbytes as bnb
import pytest
import torch
from tiny import tiny_model

from minippo.fast import int8
from minippo.fast.int8 import FastLinear8bitLt, Int8InputReuse
from minippo.quant import quantize_model

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(
        not int8.int8_matmul_is_native("cpu"), reason="the fast int8 layers need VNNI or AMX"
    ),
]


def bnb_layers(arch, tokenizer):
    """The Linear8bitLt layers of a tiny 8-bit model, in eval mode (bitsandbytes' LLM.int8() path)."""
    model = quantize_model(tiny_model(arch, len(tokenizer))).eval()
    return [m for m in model.modules() if type(m) is bnb.nn.Linear8bitLt]


def inputs(layer, seed=0):
    """Activations (3, 5, in) with outliers (|x| >= 6) in two columns, one of them also with small entries."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, layer.in_features, generator=g) * 1.7
    x[0, 1, 3] = 9.5
    x[:, :, 7] = -7.25
    x[1, 2, 7] = 0.5
    return x


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])  # gpt2 / neox: with biases
def test_forward_is_bitsandbytes_eval_forward_bit_for_bit(arch, tokenizer):
    for layer in bnb_layers(arch, tokenizer):
        fast = FastLinear8bitLt(layer, None, int8_backward=False)
        for x in (
            inputs(layer),
            inputs(layer, 1) * 0.01,
            inputs(layer)[0],
        ):  # 3-D, no outliers, 2-D
            assert torch.equal(fast(x), layer(x))
        assert fast.weight is layer.weight and fast.state is layer.state and fast.bias is layer.bias


def test_input_gradient_exact_or_int8(tokenizer):
    """int8_backward=False: bitsandbytes' own input gradient, bit for bit. True: each row of the scaled
    gradient rounded to int8: within 2% (relative Frobenius norm) of it."""
    for layer in bnb_layers("llama", tokenizer):
        grad_out = torch.randn(3, 5, layer.out_features)
        x = inputs(layer).requires_grad_()
        (want,) = torch.autograd.grad((layer(x) * grad_out).sum(), x)
        exact = FastLinear8bitLt(layer, None, int8_backward=False)
        (got,) = torch.autograd.grad((exact(x) * grad_out).sum(), x)
        assert torch.equal(got, want)
        rounded = FastLinear8bitLt(layer, None, int8_backward=True)
        (got,) = torch.autograd.grad((rounded(x) * grad_out).sum(), x)
        assert (got - want).norm() <= 0.02 * want.norm()
        assert not torch.equal(got, want)


def test_train_mode_computes_the_eval_function(tokenizer):
    layer = bnb_layers("llama", tokenizer)[0]
    x = inputs(layer)
    want = layer(x)
    fast = FastLinear8bitLt(layer, None, int8_backward=False).train()
    assert torch.equal(fast(x), want)
    assert not torch.equal(layer.train()(x), want)  # bitsandbytes' CPU train mode: another function


def counting(monkeypatch):
    made = []
    quantise = int8.quantise_rows
    monkeypatch.setattr(int8, "quantise_rows", lambda *a, **k: made.append(1) or quantise(*a, **k))
    return made


def reading(arch, tokenizer, reuse):
    """q, k, v of the first attention block, as fast layers sharing ``reuse``."""
    layers = bnb_layers(arch, tokenizer)[:3]
    return [FastLinear8bitLt(m, reuse, int8_backward=False) for m in layers], layers


def test_an_input_is_quantised_once_within_a_forward_and_afresh_outside(tokenizer, monkeypatch):
    made = counting(monkeypatch)
    reuse = Int8InputReuse()
    scope = torch.nn.Identity()
    reuse.attach(scope)
    fast, plain = reading("llama", tokenizer, reuse)
    x = inputs(plain[0])
    reuse._open(scope, ())  # as the model's forward pre-hook does
    outs = [f(x) for f in fast]
    assert len(made) == 1
    assert all(torch.equal(o, p(x)) for o, p in zip(outs, plain))
    reuse._close(scope, (), None)
    [f(x) for f in fast]
    assert len(made) == 4  # outside a forward: every call quantises
    scope(x)  # the hooks themselves open and close the scope
    assert getattr(reuse._threads, "scope", None) is None
    reuse.detach()
    assert not reuse.handles and not scope._forward_pre_hooks and not scope._forward_hooks


def test_a_write_through_data_never_returns_a_stale_result(tokenizer):
    reuse = Int8InputReuse()
    fast, plain = reading("llama", tokenizer, reuse)
    x = inputs(plain[0])
    y = inputs(plain[0], seed=5)
    reuse._open(None, ())
    fast[0](x)
    x.data.copy_(y)  # bypasses x's version counter
    assert torch.equal(fast[1](x), plain[1](y))
    x.data = inputs(plain[0], seed=6)  # another storage under the same tensor
    assert torch.equal(fast[2](x), plain[2](x))
    reuse._close(None, (), None)


def test_another_thread_never_gets_a_foreign_result(tokenizer):
    """Thread A quantises x and is held; thread B, in its own forward, quantises y; A continues with x."""
    reuse = Int8InputReuse()
    fast, plain = reading("llama", tokenizer, reuse)
    x = inputs(plain[0])
    y = inputs(plain[0], seed=3)
    a_done = threading.Event()
    b_done = threading.Event()
    results = {}

    def thread_a():
        reuse._open(None, ())
        fast[0](x)
        a_done.set()
        b_done.wait(10)
        results["a"] = fast[1](x)
        reuse._close(None, (), None)

    def thread_b():
        a_done.wait(10)
        reuse._open(None, ())
        results["b"] = fast[1](y)
        reuse._close(None, (), None)
        b_done.set()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.equal(results["a"], plain[1](x))
    assert torch.equal(results["b"], plain[1](y))
