"""How the tensor cores' fp16 mma (``tl.dot``, fp32 accumulator) treats subnormal inputs
(session 31: the value fields masked in place as fp16 subnormals gave 1.7e-4 relative error
on an H100 where the exact codes give 1e-6). One product at a time: ``a * b`` for a normal
``a`` over fp16's range and a subnormal ``b``, against the exact product; then whether a
product is lost beside a larger one in the same dot (alignment) or alone (a threshold).
On an H100 (session 31, `results/gpu/session31.txt`): every product alone exact; beside one
of 3 * 2^-14, products of 2^-32 .. 2^-30 lost and of 2^-29 or more kept: the sum's bits are
aligned from each product's nominal exponent (fp16's -14 for a subnormal)."""

import torch
import triton
import triton.language as tl


@triton.jit
def _dot(A, B, C):
    i = tl.arange(0, 16)
    a = tl.load(A + i[:, None] * 16 + i[None, :])
    b = tl.load(B + i[:, None] * 16 + i[None, :])
    tl.store(C + i[:, None] * 16 + i[None, :], tl.dot(a, b))


def dot(a, b):
    c = torch.empty(16, 16, device="cuda", dtype=torch.float32)
    _dot[(1,)](a.cuda(), b.cuda(), c, num_warps=1)
    return c.cpu().double()


def main():
    print(torch.cuda.get_device_name(), triton.__version__)
    # Row i: a = 2^(i - 9) * 1.5 (2^-9 .. 2^6); column j: b = code * 2^(s - 24) (subnormal)
    # for codes 1, 3 and shifts 0, 2, 4, 6, 8 (up to 2^-16), and two normal b for contrast.
    a = torch.zeros(16, 16, dtype=torch.float16)
    b = torch.zeros(16, 16, dtype=torch.float16)
    av = [1.5 * 2.0 ** (i - 9) for i in range(16)]
    bv = [c * 2.0 ** (s - 24) for s in (0, 2, 4, 6, 8) for c in (1, 3)] + [2.0**-14, 3.0]
    for i, x in enumerate(av):
        a[i, 0] = x
    for j, x in enumerate(bv):
        b[0, j] = x
    got = dot(a, b)
    want = a.double() @ b.double()
    print("one product a * b: relative error (rows a = 1.5 * 2^(i-9), cols b)")
    print("b:", " ".join(f"{x:.1e}" for x in bv))
    for i in range(16):
        rel = ((got[i, : len(bv)] - want[i, : len(bv)]).abs() / want[i, : len(bv)]).tolist()
        print(f"a={av[i]:.2e}", " ".join(f"{r:.0e}" for r in rel))
    # Alignment: a large product beside a small one in the same dot (k = 0 and k = 1).
    a = torch.zeros(16, 16, dtype=torch.float16)
    b = torch.zeros(16, 16, dtype=torch.float16)
    a[:, 0] = 1024.0
    b[0, :] = 3 * 2.0**-24  # large product 3 * 2^-14
    for i in range(16):
        a[i, 1] = 2.0 ** (i - 8)
    b[1, :] = 2.0**-24
    got = dot(a, b)
    want = a.double() @ b.double()
    print("a large product plus a small one (small = 2^(i-8) * 2^-24):")
    print(" ".join(f"{(got[i, 0] - want[i, 0]).item() / (2.0 ** (i - 32)):.2f}" for i in range(16)))


if __name__ == "__main__":
    main()
