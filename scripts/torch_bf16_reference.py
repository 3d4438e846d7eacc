#!/usr/bin/env python3
"""How far does PyTorch itself land from the golden fixtures when it computes in bf16?

`dinod parity --dtype bf16` holds our bf16 path to a 2e-2 relative error on every tensor.
This script measures what that tolerance asks of the reference: the same computation in
PyTorch under the official mixed-precision policy (parameters and activations bf16, the
losses, Sinkhorn-Knopp and KoLeo in f32; shared/design/dinov3-method.md section 5). It runs
  losses.safetensors      the DINO and iBOT heads on given features, teacher targets, the
                          DINO, iBOT, KoLeo and Gram losses and the gradients of the total;
  train_step.safetensors  the same behind the backbones: teacher on the global crops,
                          student on masked global + local crops, Gram teacher on the 2x
                          crops (bicubic resize to the student grid), all student gradients;
with the model and loss functions of scripts/torch_step_bench.py (drop path off, as in the
fixtures), in float64, float32 and bf16, and prints each tensor's relative error
||a - b|| / ||b|| against the float64 reference, under the names `dinod parity` uses. The
losses are f32 in every column, so the f64 column sits at ~1e-7: that it does shows the
script computes what the fixture pins down.

Usage: python scripts/torch_bf16_reference.py FIXTURE... [--device cpu|cuda] [--json]

`--json` writes {"torch", "device", "fixtures": {KIND: {TENSOR: {"f64", "f32", "bf16"}}}};
model/data/torch_bf16_errors.json is that output for the CPU, and `dinod parity` reads it to
judge each bf16 tensor against PyTorch's own bf16 error (model/src/parity.rs).
"""

import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_step_bench import COMMON, ViT, DINOHead, dino_loss, gram_loss, ibot_loss, koleo_loss, sinkhorn_knopp  # noqa: E402

LOSS = torch.float32
DEVICE = torch.device("cpu")


def load_file(path, device="cpu"):
    """The tensors of a safetensors file (the format is a JSON header and raw little-endian
    data; read here so the GPU machine needs nothing beyond PyTorch)."""
    dtypes = {"F64": torch.float64, "F32": torch.float32, "I64": torch.int64, "U8": torch.uint8}
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        data = bytearray(f.read())
    out = {}
    for name, h in header.items():
        if name == "__metadata__":
            continue
        a, b = h["data_offsets"]
        t = torch.frombuffer(data, dtype=dtypes[h["dtype"]], count=(b - a) // dtypes[h["dtype"]].itemsize, offset=a)
        out[name] = t.reshape(h["shape"]).clone().to(device)
    return out


def config(path):
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(json.loads(f.read(n))["__metadata__"]["config"])


def params(t, prefix):
    return {k[len(prefix) :]: v for k, v in t.items() if k.startswith(prefix)}


def head(t, role, d, cfg, dtype):
    h = cfg["head"]
    m = DINOHead(d, h["hidden_dim"], h["bottleneck_dim"], h["n_prototypes"])
    m.load_state_dict(params(t, f"param.{role}."))
    return m.to(DEVICE, dtype)


def backbone(t, role, cfg, dtype):
    b = cfg["backbone"]
    c = dict(COMMON, embed_dim=b["embed_dim"], depth=b["depth"], heads=b["num_heads"], patch=b["patch_size"],
             registers=b["n_storage_tokens"], ffn_ratio=b["ffn_ratio"], ln_eps=b["layernorm_eps"],
             rope_base=b["pos_embed_rope_base"])
    m = ViT(c, drop_path=0.0)
    # official state_dict names -> torch_step_bench's (which has no `.proj` / `.gamma` level)
    sd = {k.replace("patch_embed.proj.", "patch_embed.").replace(".gamma", ""): v
          for k, v in params(t, f"param.{role}.").items() if not k.endswith("bias_mask") and "rope_embed" not in k}
    m.load_state_dict(sd)
    return m.to(DEVICE, dtype)


def heads_and_losses(t, cfg, dtype, f, n_local):
    """Heads, teacher targets and losses on features `f` (student ones carry grad).
    Returns ({fixture name: tensor}, total, (dino head, ibot head))."""
    lc = cfg["loss"]
    g_cls, l_cls, g_patch = f["g_cls"], f["l_cls"], f["g_patch"]
    two, b, d = g_cls.shape
    idx = t["input.mask_indices"]
    temp, iters = cfg["teacher_temp"], lc["sinkhorn_knopp_iterations"]
    dino, ibot = head(t, "dino_head", d, cfg, dtype), head(t, "ibot_head", d, cfg, dtype)
    with torch.no_grad():
        tdino, tibot = head(t, "teacher_dino_head", d, cfg, dtype), head(t, "teacher_ibot_head", d, cfg, dtype)
        t_logits = tdino(f["t_cls"].flatten(0, 1))
        k = t_logits.shape[-1]
        t_probs = sinkhorn_knopp(t_logits, temp, iters).view(two, b, k)
        ti_probs = sinkhorn_knopp(tibot(f["t_patch"].flatten(0, 2)[idx]), temp, iters)
    st = lc["student_temp"]
    s_global = dino(g_cls.flatten(0, 1)).view(two, b, k)
    s_local = dino(l_cls.flatten(0, 1)).view(n_local, b, k)
    s_ibot = ibot(g_patch.flatten(0, 2)[idx])
    dl = dino_loss(s_local, t_probs, st, False)
    dg = dino_loss(s_global, t_probs, st, True)
    ib = ibot_loss(s_ibot, ti_probs, t["input.masks_weight"].to(LOSS), two * b, st)
    ko = sum(koleo_loss(c) for c in g_cls.unbind(0)) / two
    gr = gram_loss(g_patch.flatten(0, 1), f["gram"])
    total = (
        lc["dino_loss_weight"] * (lc["dino_local_scale"] * dl + lc["dino_global_scale"] * dg)
        + lc["koleo_loss_weight"] * lc["koleo_scale"] * ko
        + lc["ibot_loss_weight"] * ib
        + cfg["gram"]["loss_weight"] * gr
    )
    out = {
        "expect.teacher.dino_head.out": t_logits.view(two, b, k),
        "expect.sk.teacher_probs": t_probs,
        "expect.sk.ibot_teacher_probs": ti_probs,
        "expect.dino_head.out_global": s_global,
        "expect.dino_head.out_local": s_local,
        "expect.ibot_head.out": s_ibot,
        "expect.loss.dino_local": dl,
        "expect.loss.dino_global": dg,
        "expect.loss.ibot": ib,
        "expect.loss.koleo": ko,
        "expect.loss.gram": gr,
        "expect.loss.total": total,
    }
    return out, total, (dino, ibot)


def head_grads(out, heads):
    for role, m in zip(("dino_head", "ibot_head"), heads):
        for n, p in m.named_parameters():
            out[f"grad.{role}.{n}"] = p.grad


def leaf(x, dtype):
    return x.detach().to(dtype).clone().requires_grad_()


def losses_fixture(t, cfg, dtype):
    f = {
        "g_cls": leaf(t["input.student.global_cls"], dtype),
        "l_cls": leaf(t["input.student.local_cls"], dtype),
        "g_patch": leaf(t["input.student.global_patch"], dtype),
        "t_cls": t["input.teacher.global_cls"].to(dtype),
        "t_patch": t["input.teacher.global_patch"].to(dtype),
        "gram": t["expect.gram.teacher_patch_resized"].to(dtype),
    }
    n_local = cfg["official_cfg_overrides"]["crops"]["local_crops_number"]
    out, total, heads = heads_and_losses(t, cfg, dtype, f, n_local)
    total.backward()
    head_grads(out, heads)
    for n in ("global_cls", "local_cls", "global_patch"):
        out[f"grad.input.student.{n}"] = f[n.replace("global_", "g_").replace("local_", "l_")].grad
    return out


def train_step_fixture(t, cfg, dtype):
    b, n_global, n_local = cfg["batch"], cfg["n_global_crops"], cfg["n_local_crops"]
    student = backbone(t, "backbone", cfg, dtype)
    glob = t["input.global_crops"].to(dtype)
    masks = t["input.masks"].bool()
    with torch.no_grad():
        teacher = backbone(t, "teacher_backbone", cfg, dtype)
        tf = teacher.forward_list([glob], [None])[0]
        gram_teacher = backbone(t, "gram_teacher_backbone", cfg, dtype)
        gp = gram_teacher.forward_list([t["input.gram_crops"].to(dtype)], [None])[0]["patch"]
        (gh, gw), (sh, sw) = cfg["grid_gram_teacher"], cfg["grid_global"]
        n, _, d = gp.shape
        grid = gp.transpose(1, 2).reshape(n, d, gh, gw).float()
        gram = F.interpolate(grid, size=(sh, sw), mode="bicubic", align_corners=False, antialias=False)
        gram = gram.flatten(2).transpose(1, 2).to(dtype)
    sg, sl = student.forward_list([glob, t["input.local_crops"].to(dtype)], [masks, None])
    d = sg["cls"].shape[-1]
    f = {
        "g_cls": sg["cls"].view(n_global, b, d),
        "l_cls": sl["cls"].view(n_local, b, d),
        "g_patch": sg["patch"].reshape(n_global, b, -1, d),
        "t_cls": tf["cls"].view(n_global, b, d),
        "t_patch": tf["patch"].reshape(n_global, b, -1, d),
        "gram": gram,
    }
    out, total, heads = heads_and_losses(t, cfg, dtype, f, n_local)
    total.backward()
    head_grads(out, heads)
    out["expect.gram.teacher_patch_resized"] = gram
    out["expect.student.global_cls"] = f["g_cls"]
    out["expect.teacher.cls"] = f["t_cls"]
    for n, p in student.named_parameters():
        key = n.replace("patch_embed.", "patch_embed.proj.")
        key = key + ".gamma" if key.split(".")[-1] in ("ls1", "ls2") else key
        out[f"grad.backbone.{key}"] = p.grad
    return out


def rel(a, b):
    a, b = a.detach().double().flatten(), b.double().flatten()
    den = b.norm()
    return ((a - b).norm() / den if den > 0 else (a - b).norm()).item()


def main():
    global DEVICE
    argv = sys.argv[1:]
    if "--device" in argv:
        i = argv.index("--device")
        DEVICE = torch.device(argv[i + 1])
        del argv[i : i + 2]
    paths = [a for a in argv if not a.startswith("--")]
    result = {}
    for path in paths:
        t = load_file(path, device=str(DEVICE))
        cfg = config(path)
        run = {"losses": losses_fixture, "train_step": train_step_fixture}[cfg["fixture"]]
        rows = {}
        for name, dtype in (("f64", torch.float64), ("f32", torch.float32), ("bf16", torch.bfloat16)):
            for n, v in run(t, cfg, dtype).items():
                if n in t:
                    rows.setdefault(n, {})[name] = rel(v, t[n])
        result[cfg["fixture"]] = rows
    if "--json" in argv:
        doc = {"torch": torch.__version__, "device": str(DEVICE), "fixtures": result}
        print(json.dumps(doc, indent=1, sort_keys=True))
        return
    for path, rows in result.items():
        print(f"torch {torch.__version__} on {DEVICE}, {path}: relative error against the float64 fixture")
        print(f"{'tensor':<44} {'f64':>9} {'f32':>9} {'bf16':>9}")
        for n, r in rows.items():
            print(f"{n:<44} {r['f64']:>9.2e} {r['f32']:>9.2e} {r['bf16']:>9.2e}")
        worst = max(rows.items(), key=lambda kv: kv[1]["bf16"])
        over = sum(r["bf16"] >= 2e-2 for r in rows.values())
        print(f"{path}: {len(rows)} tensors; bf16: worst {worst[0]} {worst[1]['bf16']:.3e}, {over} at or over 2e-2; "
              f"worst f64 (losses f32) {max(r['f64'] for r in rows.values()):.1e}\n")


if __name__ == "__main__":
    main()
