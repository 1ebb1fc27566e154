"""The outputs of the BN kernels that tests/test_builds.py compares between builds (imported
there and by the subprocess that loads another build)."""
import numpy as np


def outputs(bn, a):
    """Every output of the kernels under test, for the inputs in ``a``."""
    out = {}
    for name in ("x32", "x64"):
        x = a[name]
        part = np.empty((2,) + x.shape[:2])
        bn.row_moments(x, part)
        out["moments_" + name] = part
    x, gy = a["xb"], a["gy"]
    c = x.shape[1]
    h, packed = np.empty_like(x), np.empty(x.size // 2, np.uint8)
    nf = bn.bn_apply_pack(a["xu"], a["mu"], a["scale"], a["beta"], a["k"], a["s"], 4, h, packed)
    out.update(h=h, packed=packed, nf=np.int64(nf))
    for mode, codes in (("exact", False), ("codes", True)):
        gx, ggamma, gbeta = np.empty_like(x), np.empty(c), np.empty(c)
        if codes:
            bn.bn_backward_codes(gy, a["codes"], a["s"], a["x_step"], a["x_off"], 4, a["scale"], True,
                                 gx, ggamma, gbeta)
        else:
            bn.bn_backward(gy, x, a["mu"], a["inv"], a["scale"], a["beta"], None, 1, True, gx, ggamma, gbeta)
        out.update({mode + "_gx": gx, mode + "_ggamma": ggamma, mode + "_gbeta": gbeta})
    return out
