"""CSRC codebook: fitting, the highest-cosine/projection rules, bytes round trip, persistence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.codebook import CodebookConfig, ResidualCodebook, balanced_assign, spherical_kmeans


def clustered(n: int, dim: int = 16, clusters: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(clusters, dim, generator=g)
    which = torch.randint(0, clusters, (n,), generator=g)
    return means[which] + 0.4 * torch.randn(n, dim, generator=g)


def book(levels: int = 3, size: int = 16, scale_bits: int = 8, seed: int = 0, **kw) -> ResidualCodebook:
    return ResidualCodebook(
        CodebookConfig(levels=levels, size=size, kmeans_iters=8, scale_bits=scale_bits, seed=seed, **kw), dim=16
    )


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    return clustered(1200)


@pytest.fixture(scope="module")
def fitted(data) -> ResidualCodebook:
    return book(levels=3).fit(data)


@pytest.mark.parametrize("scale_bits", [8, 0])
def test_reconstruction_improves_with_levels(data, scale_bits):
    cos = [book(levels=L, scale_bits=scale_bits).fit(data).reconstruction_cosine(data) for L in (1, 2, 4)]
    assert cos[0] < cos[1] < cos[2]
    assert cos[2] > 0.9


def test_encode_follows_highest_cosine_and_projection(fitted, data):
    x = data[:200]
    codes, _ = fitted.encode(x)
    r = x.clone()
    for level in range(fitted.config.levels):
        c = fitted.centres[level]
        brute = F.cosine_similarity(r[:, None, :], c[None, :, :], dim=-1).argmax(dim=1)
        assert torch.equal(codes[:, level], brute)
        chosen = c[brute]
        alpha = (r * chosen).sum(-1) / chosen.pow(2).sum(-1)
        r = r - alpha[:, None] * chosen
        # the next residual is orthogonal to the centre just used
        assert (r * chosen).sum(-1).abs().max() < 1e-4


def test_scale_free_decode_uses_mean_alpha(data):
    cb = book(levels=2, scale_bits=0).fit(data)
    codes, scales = cb.encode(data[:5])
    assert scales is None
    expected = sum(cb.mean_alpha[l, codes[:, l], None] * cb.centres[l, codes[:, l]] for l in range(2))
    torch.testing.assert_close(cb.decode(codes), expected)
    assert cb.bytes_per_item == 2


def test_pack_unpack_round_trip(fitted, data):
    codes, scales = fitted.encode(data)
    rows = fitted.pack(codes, scales)
    assert rows.dtype == np.uint8 and rows.shape == (len(data), fitted.bytes_per_item)
    assert fitted.bytes_per_item == 3 + 3
    c2, s2 = fitted.unpack(rows)
    assert torch.equal(c2, codes) and torch.equal(s2, scales)
    blob = fitted.pack_history(codes[:50], scales[:50])
    assert isinstance(blob, bytes) and len(blob) == 50 * fitted.bytes_per_item
    c3, s3 = fitted.unpack_history(blob)
    assert torch.equal(c3, codes[:50]) and torch.equal(s3, scales[:50])
    torch.testing.assert_close(fitted.decode_history(blob), fitted.decode(codes[:50], scales[:50]))
    with pytest.raises(ValueError):
        fitted.unpack_history(blob[:-1])


def test_uint16_codes_for_large_codebooks():
    x = clustered(600)
    cb = ResidualCodebook(CodebookConfig(levels=2, size=300, kmeans_iters=2, scale_bits=0), dim=16).fit(x)
    codes, _ = cb.encode(x)
    assert cb.bytes_per_item == 4 and int(codes.max()) > 255
    c2, _ = cb.unpack_history(cb.pack_history(codes, None))
    assert torch.equal(c2, codes)


def test_deterministic_with_seed(data):
    a, b = book(seed=3).fit(data), book(seed=3).fit(data)
    assert torch.equal(a.centres, b.centres)
    assert torch.equal(a.encode(data)[0], b.encode(data)[0])
    assert not torch.equal(a.centres, book(seed=4).fit(data).centres)


def test_state_and_manifest_rebuild_identical_codes(fitted, data, tmp_path):
    from safetensors.torch import load_file, save_file

    save_file(fitted.state_dict(), tmp_path / "codebook.safetensors")
    loaded = ResidualCodebook.from_state(fitted.to_manifest(), load_file(tmp_path / "codebook.safetensors"))
    assert loaded.config == fitted.config
    c1, s1 = fitted.encode(data)
    c2, s2 = loaded.encode(data)
    assert torch.equal(c1, c2) and torch.equal(s1, s2)


def test_balanced_kmeans_balances_cluster_sizes():
    # one dominant cluster: plain k-means leaves cluster sizes uneven; balanced caps them at N / C
    x = torch.cat([clustered(900, clusters=1, seed=1), clustered(100, clusters=3, seed=2)])
    xn = F.normalize(x, dim=-1)
    sizes = {}
    for balance in (True, False):
        centres = spherical_kmeans(x, 10, 10, balance, torch.Generator().manual_seed(0))
        sim = xn @ centres.T
        assign = balanced_assign(sim, 100) if balance else sim.argmax(1)
        sizes[balance] = torch.bincount(assign, minlength=10)
    assert sizes[True].max() <= 100 and sizes[True].min() >= 50
    assert sizes[False].max() > sizes[True].max()


def test_balanced_assign_respects_capacity_and_prefers_best():
    sim = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.6], [0.1, 0.9]])
    assign = balanced_assign(sim, capacity=2)
    assert torch.equal(assign, torch.tensor([0, 0, 1, 1]))


def test_fewer_vectors_than_centres():
    x = clustered(5)
    cb = book(levels=2, size=16).fit(x)
    codes, scales = cb.encode(x)
    assert codes.shape == (5, 2) and int(codes.max()) < 16
    assert cb.reconstruction_cosine(x) > 0.9
    assert torch.isfinite(cb.decode(codes, scales)).all()


def test_unfitted_and_bad_input_raise(data):
    with pytest.raises(RuntimeError):
        book().encode(data)
    with pytest.raises(ValueError):
        book().fit(torch.zeros(0, 16))
    with pytest.raises(ValueError):
        CodebookConfig(scale_bits=9)
