"""DenseFactorization against torch/MKL quirks of batched LU."""

def test_batched_lu_is_correct_after_set_num_threads():
    """torch 2.13's MKL batched LU returns invalid pivots (or hangs) for orders ≥ ~150 once
    torch.set_num_threads has been called; DenseFactorization must still solve exactly.
    Run in a subprocess so the thread setting does not leak into other tests."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import torch
        from torchdiffopt.linalg.factorization import DenseFactorization
        torch.set_num_threads(2)
        g = torch.Generator().manual_seed(0)
        for order in (60, 200):
            A = torch.randn(4, order, order, dtype=torch.float64, generator=g)
            K = A + A.mT
            rhs = torch.randn(4, order, 1, dtype=torch.float64, generator=g)
            z = DenseFactorization(K).solve(rhs)
            assert (K @ z - rhs).abs().max() < 1e-8, order
        # two batch dimensions and a nonsymmetric matrix, solved both ways: the factors
        # written in place keep their layout through the reshape
        A = torch.randn(2, 2, 200, 200, dtype=torch.float64, generator=g)
        rhs = torch.randn(2, 2, 200, 3, dtype=torch.float64, generator=g)
        lu = DenseFactorization(A, symmetric=False)
        assert (A @ lu.solve(rhs) - rhs).abs().max() < 1e-8
        assert (A.mT @ lu.solve(rhs, transpose=True) - rhs).abs().max() < 1e-8
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
