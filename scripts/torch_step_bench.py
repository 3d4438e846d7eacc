#!/usr/bin/env python3
"""PyTorch baseline for `dinod bench step`: the same DINOv3 training step, timed the same way.

Written from the recipe specification (shared/design/dinov3-method.md §1-3) for a
side-by-side comparison with dinod on the same machine; it is our own implementation, not
the official code. What one step does, in the order `dinod bench step` reports it:

  teacher          EMA teacher backbone on the 2B unmasked global crops (no grad), DINO head
                   on the class tokens, iBOT head on the patch tokens at the masked positions,
                   Sinkhorn-Knopp (3 iterations) on both
  gram_teacher     (t16-gram) frozen Gram teacher on the 2B crops at 2x resolution (no grad),
                   patch features bicubically resized to the student grid
  student_forward  student backbone on [masked global crops, local crops] as one list
                   forward (token-wise layers on the concatenated tokens, attention per
                   group), batch-subset drop path 0.1 on every residual branch
  losses           student DINO head on all class tokens, iBOT head on the masked patches,
                   DINO (local + cross-pair global), iBOT, KoLeo, Gram
  backward         autograd of the weighted total
  optimizer        per-module gradient clipping (3.0) and AdamW (fused on CPU and CUDA) with
                   the official parameter groups (layer-wise LR decay 0.9, patch embedding
                   x0.2, no weight decay on biases / norms / LayerScale)
  ema              teacher <- m teacher + (1 - m) student with foreach ops

Model: ViT with patch 16 (conv2d), CLS + 4 register tokens, no absolute position embedding,
2-D RoPE (base 100, per-axis coordinates) on the patch tokens, qkv bias with the key part
masked, LayerScale 1e-5, LayerNorm eps 1e-5, exact GELU MLP (ratio 4), scaled dot-product
attention, final LayerNorm; DINO and iBOT heads 2048 / 256 / 8192 (3-layer MLP, L2
normalisation, bias-free prototype layer).

Usage:
  python scripts/torch_step_bench.py --config s16 [--device cpu|cuda] [--threads 2]
         [--warmup 2] [--iters 5] [--json]
Configs: s16 = vit_small (384/12/6) as configs/bench-cpu-s16.toml; t16-gram = vit_tiny
(192/12/3) with the Gram teacher on 256 px crops as configs/bench-cpu-t16-gram.toml.
Batch 16, 2 x 128 px global crops, 8 x 64 px local crops, float32.
gpu-s16 / gpu-b16 (+ -gram): configs/bench-gpu-*.toml (batch 64, 224 / 96 px crops,
65536 prototypes, Gram teacher at 448 px); `--amp bf16` for bf16 autocast.
"""

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

CONFIGS = {
    "s16": dict(embed_dim=384, depth=12, heads=6, gram_size=None),
    "t16-gram": dict(embed_dim=192, depth=12, heads=3, gram_size=256),
}
# The GPU benchmarks of configs/bench-gpu-*.toml: batch 64, 2 x 224 px global and
# 8 x 96 px local crops, heads with the official 65536 prototypes, Gram teacher at 2x.
GPU = dict(batch=64, global_size=224, local_size=96, n_local=8, prototypes=65536)
CONFIGS.update({
    "gpu-s16": dict(GPU, embed_dim=384, depth=12, heads=6, gram_size=None),
    "gpu-s16-gram": dict(GPU, embed_dim=384, depth=12, heads=6, gram_size=448),
    "gpu-b16": dict(GPU, embed_dim=768, depth=12, heads=12, gram_size=None),
    "gpu-b16-gram": dict(GPU, embed_dim=768, depth=12, heads=12, gram_size=448),
})
COMMON = dict(
    patch=16,
    registers=4,
    ffn_ratio=4.0,
    layerscale=1e-5,
    ln_eps=1e-5,
    rope_base=100.0,
    drop_path=0.1,
    head_hidden=2048,
    head_bottleneck=256,
    prototypes=8192,
    batch=16,
    global_size=128,
    local_size=64,
    n_local=8,
    student_temp=0.1,
    teacher_temp=0.07,
    sk_iters=3,
    koleo_weight=0.1,
    ibot_weight=1.0,
    gram_weight=1.0,
    lr=1e-3,
    weight_decay=0.04,
    momentum=0.992,
    clip=3.0,
    layer_decay=0.9,
    patch_embed_lr_mult=0.2,
    mask_ratio=(0.1, 0.5),
    mask_sample_prob=0.5,
)


# ------------------------------------------------------------------------------ backbone


def rope_tables(h, w, head_dim, base, device, dtype):
    """sin / cos tables [h*w, head_dim] for an h x w grid, per-axis coordinates in [-1, 1]."""
    q = head_dim // 4
    periods = base ** (4 * torch.arange(q, device=device, dtype=torch.float32) / head_dim)
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h * 2 - 1
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w * 2 - 1
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    coords = torch.stack([cy.flatten(), cx.flatten()], dim=-1)  # [hw, 2]
    ang = 2 * math.pi * coords[:, :, None] / periods[None, None, :]  # [hw, 2, q]
    ang = ang.flatten(1).tile(2)  # [hw, head_dim]
    return ang.sin().to(dtype), ang.cos().to(dtype)


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        mask = torch.ones(3 * dim)
        mask[dim : 2 * dim] = 0  # no key bias
        self.register_buffer("bias_mask", mask, persistent=False)
        self.proj = nn.Linear(dim, dim)

    def forward_list(self, xs, ropes):
        # qkv and proj on all tokens at once, attention per group
        shapes = [x.shape for x in xs]
        flat = torch.cat([x.flatten(0, 1) for x in xs])
        qkv = F.linear(flat, self.qkv.weight, self.qkv.bias * self.bias_mask)
        outs = []
        off = 0
        for (b, n, d), rope in zip(shapes, ropes):
            part = qkv[off : off + b * n].view(b, n, 3, self.heads, d // self.heads)
            off += b * n
            q, k, v = part.permute(2, 0, 3, 1, 4).unbind(0)  # [b, heads, n, dh]
            if rope is not None:
                sin, cos = rope
                pre = n - sin.shape[0]
                q = torch.cat([q[:, :, :pre], q[:, :, pre:] * cos + rotate_half(q[:, :, pre:]) * sin], dim=2)
                k = torch.cat([k[:, :, :pre], k[:, :, pre:] * cos + rotate_half(k[:, :, pre:]) * sin], dim=2)
            o = F.scaled_dot_product_attention(q, k, v)
            outs.append(o.transpose(1, 2).reshape(b * n, d))
        out = self.proj(torch.cat(outs))
        res = []
        off = 0
        for b, n, d in shapes:
            res.append(out[off : off + b * n].view(b, n, d))
            off += b * n
        return res


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, heads, ffn_ratio, ls_init, eps, drop_path):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.ls1 = nn.Parameter(torch.full((dim,), ls_init))
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * ffn_ratio))
        self.ls2 = nn.Parameter(torch.full((dim,), ls_init))
        self.drop_path = drop_path

    @staticmethod
    def _cat(xs):
        return torch.cat([x.flatten(0, 1) for x in xs])

    @staticmethod
    def _split(flat, xs):
        out, off = [], 0
        for x in xs:
            b, n, d = x.shape
            out.append(flat[off : off + b * n].view(b, n, d))
            off += b * n
        return out

    def forward_list(self, xs, ropes):
        if self.training and self.drop_path > 0:
            # batch-subset residual dropping: the branch runs on a random subset of each
            # group and is added back with scale b / subset
            sizes = [max(int(x.shape[0] * (1 - self.drop_path)), 1) for x in xs]
            idx1 = [torch.randperm(x.shape[0], device=x.device)[:s] for x, s in zip(xs, sizes)]
            sub = [x[i] for x, i in zip(xs, idx1)]
            h = self._split(self.norm1(self._cat(sub)), sub)
            r1 = self.attn.forward_list(h, ropes)
            xs = [torch.index_add(x, 0, i, r * self.ls1, alpha=x.shape[0] / s) for x, i, r, s in zip(xs, idx1, r1, sizes)]
            idx2 = [torch.randperm(x.shape[0], device=x.device)[:s] for x, s in zip(xs, sizes)]
            sub = [x[i] for x, i in zip(xs, idx2)]
            r2 = self._split(self.mlp(self.norm2(self._cat(sub))), sub)
            return [torch.index_add(x, 0, i, r * self.ls2, alpha=x.shape[0] / s) for x, i, r, s in zip(xs, idx2, r2, sizes)]
        r1 = self.attn.forward_list([self.norm1(x) for x in xs], ropes)
        xs = [x + r * self.ls1 for x, r in zip(xs, r1)]
        return [x + self.mlp(self.norm2(x)) * self.ls2 for x in xs]


class ViT(nn.Module):
    def __init__(self, c, drop_path):
        super().__init__()
        d, p = c["embed_dim"], c["patch"]
        self.patch, self.heads, self.rope_base = p, c["heads"], c["rope_base"]
        self.patch_embed = nn.Conv2d(3, d, kernel_size=p, stride=p)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.storage_tokens = nn.Parameter(torch.randn(1, c["registers"], d) * 0.02)
        self.mask_token = nn.Parameter(torch.zeros(1, d))
        self.blocks = nn.ModuleList(
            [Block(d, c["heads"], c["ffn_ratio"], c["layerscale"], c["ln_eps"], drop_path) for _ in range(c["depth"])]
        )
        self.norm = nn.LayerNorm(d, eps=c["ln_eps"])
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def tokens(self, images, masks):
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # [b, hw, d]
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        b = x.shape[0]
        return torch.cat([self.cls_token.expand(b, -1, -1), self.storage_tokens.expand(b, -1, -1), x], dim=1)

    def forward_list(self, images, masks):
        xs = [self.tokens(im, m) for im, m in zip(images, masks)]
        grids = [(im.shape[2] // self.patch, im.shape[3] // self.patch) for im in images]
        dh = xs[0].shape[-1] // self.heads
        for blk in self.blocks:
            # the official model computes the RoPE tables inside the block loop
            ropes = [rope_tables(h, w, dh, self.rope_base, xs[0].device, xs[0].dtype) for h, w in grids]
            xs = blk.forward_list(xs, ropes)
        prefix = 1 + self.storage_tokens.shape[1]
        out = []
        for x in xs:
            xn = self.norm(x)
            out.append({"cls": xn[:, 0], "patch": xn[:, prefix:]})
        return out


class DINOHead(nn.Module):
    def __init__(self, in_dim, hidden, bottleneck, k):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, bottleneck))
        self.last_layer = nn.Linear(bottleneck, k, bias=False)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2, eps=1e-12))


class SslModel(nn.Module):
    def __init__(self, c, drop_path):
        super().__init__()
        d = c["embed_dim"]
        self.backbone = ViT(c, drop_path)
        self.dino_head = DINOHead(d, c["head_hidden"], c["head_bottleneck"], c["prototypes"])
        self.ibot_head = DINOHead(d, c["head_hidden"], c["head_bottleneck"], c["prototypes"])


# -------------------------------------------------------------------------------- losses


@torch.no_grad()
def sinkhorn_knopp(logits, temp, iters):
    q = torch.exp(logits.float() / temp).t()  # [K, N]
    k, n = q.shape
    q /= q.sum()
    for _ in range(iters):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= n
    q *= n
    return q.t()


def dino_loss(student_logits, teacher_probs, temp, ignore_diagonal):
    """student [S, B, K] vs teacher [T, B, K]: mean CE over (s, t, b), optionally s != t."""
    s, b, _ = student_logits.shape
    t = teacher_probs.shape[0]
    ls = F.log_softmax(student_logits.float() / temp, dim=-1)
    pair = -torch.einsum("sbk,tbk->st", ls, teacher_probs)
    if ignore_diagonal:
        m = min(s, t)
        return (pair.sum() - torch.diagonal(pair).sum()) / (b * s * t - b * m)
    return pair.sum() / (b * s * t)


def ibot_loss(student_logits, teacher_probs, weights, n_crops, temp):
    ce = torch.sum(teacher_probs * F.log_softmax(student_logits.float() / temp, dim=-1), dim=-1)
    return -(ce * weights).sum() / n_crops


def koleo_loss(x, eps=1e-8):
    x = F.normalize(x.float(), dim=-1, p=2, eps=eps)
    with torch.no_grad():
        dots = x @ x.t()
        dots.fill_diagonal_(-1)
        nn_idx = dots.argmax(dim=1)
    dist = F.pairwise_distance(x, x[nn_idx], p=2, eps=eps)
    return -torch.log(dist + eps).mean()


def gram_loss(student_patches, teacher_patches):
    s = F.normalize(student_patches.float(), dim=-1)
    t = F.normalize(teacher_patches.float(), dim=-1)
    return F.mse_loss(s @ s.transpose(1, 2), t @ t.transpose(1, 2))


# ------------------------------------------------------------------------------ the step


def make_masks(n_crops, patches, c, gen):
    """Exactly int(n_crops * 0.5) masked crops with ratios linspace(0.1, 0.5)[1:] (the
    official collate's counts). Positions are uniform here; only the counts matter for time."""
    n_masked = int(n_crops * c["mask_sample_prob"])
    lo, hi = c["mask_ratio"]
    ratios = torch.linspace(lo, hi, n_masked + 1)[1:]
    masks = torch.zeros(n_crops, patches, dtype=torch.bool)
    for i in range(n_masked):
        cnt = int(patches * ratios[i].item())
        masks[i, torch.randperm(patches, generator=gen)[:cnt]] = True
    return masks[torch.randperm(n_crops, generator=gen)]


def param_groups(model, c):
    depth = len(model.backbone.blocks)
    groups = {}
    for module_name in ("backbone", "dino_head", "ibot_head"):
        module = getattr(model, module_name)
        for name, p in module.named_parameters():
            wd = 0.0 if (name.endswith("bias") or "norm" in name or name.startswith("ls") or ".ls" in name) else 1.0
            lr = 1.0
            if module_name == "backbone":
                if name.startswith("blocks."):
                    layer_id = int(name.split(".")[1]) + 1
                elif name.startswith("norm"):
                    layer_id = depth + 1
                else:
                    layer_id = 0
                lr = c["layer_decay"] ** (depth + 1 - layer_id)
                if "patch_embed" in name:
                    lr *= c["patch_embed_lr_mult"]
            key = (lr, wd, "last_layer" in name)
            groups.setdefault(key, []).append(p)
    return [
        {"params": ps, "lr": c["lr"] * lr, "weight_decay": c["weight_decay"] * wd, "lr_multiplier": lr}
        for (lr, wd, _), ps in groups.items()
    ]


class Bench:
    def __init__(self, c, device, amp):
        self.c, self.device, self.amp = c, device, amp
        torch.manual_seed(0)
        self.student = SslModel(c, c["drop_path"]).to(device)
        self.teacher = SslModel(c, 0.0).to(device)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.eval()
        self.teacher.requires_grad_(False)
        self.gram_teacher = None
        if c["gram_size"]:
            self.gram_teacher = ViT(c, 0.0).to(device)
            self.gram_teacher.load_state_dict(self.teacher.backbone.state_dict())
            self.gram_teacher.eval()
            self.gram_teacher.requires_grad_(False)
        self.student.train()
        fused = device.type in ("cpu", "cuda")
        self.opt = torch.optim.AdamW(param_groups(self.student, c), betas=(0.9, 0.999), eps=1e-8, fused=fused)
        self.ema_t = [p for p in self.teacher.parameters()]
        self.ema_s = [p for p in self.student.parameters()]
        gen = torch.Generator().manual_seed(0)
        b = c["batch"]
        g, l = c["global_size"], c["local_size"]
        self.global_crops = torch.randn(2 * b, 3, g, g, generator=gen).to(device)
        self.local_crops = torch.randn(c["n_local"] * b, 3, l, l, generator=gen).to(device)
        self.gram_crops = None
        if c["gram_size"]:
            s = c["gram_size"]
            self.gram_crops = torch.randn(2 * b, 3, s, s, generator=gen).to(device)
        p = (g // c["patch"]) ** 2
        masks = make_masks(2 * b, p, c, gen)
        self.masks = masks.to(device)
        self.mask_indices = masks.flatten().nonzero().flatten().to(device)
        counts = masks.sum(dim=1).clamp(min=1).float()
        self.masks_weight = (1.0 / counts)[:, None].expand_as(masks)[masks].to(device)
        self.n_masked = int(self.mask_indices.numel())

    def autocast(self):
        if self.amp == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def step(self, mark):
        c = self.c
        b, nl = c["batch"], c["n_local"]
        # teacher
        with torch.no_grad(), self.autocast():
            t = self.teacher.backbone.forward_list([self.global_crops], [None])[0]
            t_cls = t["cls"]
            t_patch = t["patch"].flatten(0, 1)
            t_dino = self.teacher.dino_head(t_cls)
            t_ibot = self.teacher.ibot_head(t_patch.index_select(0, self.mask_indices))
            dino_probs = sinkhorn_knopp(t_dino, c["teacher_temp"], c["sk_iters"]).view(2, b, -1)
            ibot_probs = sinkhorn_knopp(t_ibot, c["teacher_temp"], c["sk_iters"])
        mark("teacher")
        gram_target = None
        if self.gram_teacher is not None:
            with torch.no_grad(), self.autocast():
                gp = self.gram_teacher.forward_list([self.gram_crops], [None])[0]["patch"]  # [2B, Pt, D]
                nt = int(math.isqrt(gp.shape[1]))
                ns = c["global_size"] // c["patch"]
                d = gp.shape[-1]
                grid = gp.transpose(1, 2).reshape(2 * b, d, nt, nt)
                gram_target = F.interpolate(grid.float(), size=(ns, ns), mode="bicubic", align_corners=False, antialias=False)
                gram_target = gram_target.flatten(2).transpose(1, 2)
            mark("gram_teacher")
        # student
        with self.autocast():
            sg, sl = self.student.backbone.forward_list([self.global_crops, self.local_crops], [self.masks, None])
        mark("student_forward")
        with self.autocast():
            cls_all = torch.cat([sg["cls"], sl["cls"]])
            logits = self.student.dino_head(cls_all)
            g_logits = logits[: 2 * b].view(2, b, -1)
            l_logits = logits[2 * b :].view(nl, b, -1)
            masked = sg["patch"].flatten(0, 1).index_select(0, self.mask_indices)
            i_logits = self.student.ibot_head(masked)
        global_terms, local_terms = 2.0, 2.0 * nl
        total_terms = global_terms + local_terms
        d_local = dino_loss(l_logits, dino_probs, c["student_temp"], False)
        d_global = dino_loss(g_logits, dino_probs, c["student_temp"], True)
        koleo = sum(koleo_loss(x) for x in sg["cls"].chunk(2))
        ibot = ibot_loss(i_logits, ibot_probs, self.masks_weight, 2 * b, c["student_temp"])
        loss = local_terms / total_terms * d_local + global_terms / total_terms * d_global + c["koleo_weight"] * koleo + c["ibot_weight"] * ibot
        if gram_target is not None:
            loss = loss + c["gram_weight"] * gram_loss(sg["patch"], gram_target)
        mark("losses")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        mark("backward")
        for m in (self.student.backbone, self.student.dino_head, self.student.ibot_head):
            torch.nn.utils.clip_grad_norm_(m.parameters(), c["clip"], foreach=True)
        self.opt.step()
        mark("optimizer")
        with torch.no_grad():
            torch._foreach_mul_(self.ema_t, c["momentum"])
            torch._foreach_add_(self.ema_t, self.ema_s, alpha=1 - c["momentum"])
        mark("ema")
        return loss.item()


def peak_rss_mib():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="s16")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads on CPU (default 2)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--amp", choices=["none", "bf16"], default="none", help="autocast for forward passes (default: float32)")
    ap.add_argument("--batch", type=int, default=None, help="override the batch size (default 16)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    c = dict(COMMON, **CONFIGS[args.config])
    if args.batch:
        c["batch"] = args.batch
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    bench = Bench(c, device, args.amp)
    names = ["teacher", "gram_teacher", "student_forward", "losses", "backward", "optimizer", "ema"]
    totals, cpu, phases = [], [], {n: [] for n in names}
    for it in range(args.warmup + args.iters):
        times = dict.fromkeys(names, 0.0)
        bench.sync()
        c0 = cpu_seconds()
        t0 = last = time.perf_counter()

        def mark(name):
            nonlocal last
            bench.sync()
            now = time.perf_counter()
            times[name] += (now - last) * 1e3
            last = now

        loss = bench.step(mark)
        total = (time.perf_counter() - t0) * 1e3
        if not math.isfinite(loss):
            sys.exit(f"non-finite loss {loss}")
        if it >= args.warmup:
            totals.append(total)
            cpu.append((cpu_seconds() - c0) * 1e3)
            for n in names:
                phases[n].append(times[n])
    med = statistics.median(totals)
    out = {
        "config": args.config,
        "device": args.device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "amp": args.amp,
        "params": sum(p.numel() for p in bench.student.parameters()),
        "masked_patches": bench.n_masked,
        "iters": args.iters,
        "median_ms": med,
        "min_ms": min(totals),
        "cpu_ms_per_step": statistics.median(cpu),
        "phases_ms": [[n, statistics.median(phases[n])] for n in names],
        "images_per_s": c["batch"] / (med / 1e3),
        "peak_rss_mib": peak_rss_mib(),
    }
    if device.type == "cuda":
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["gpu"] = torch.cuda.get_device_name()
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"torch {out['torch']} {args.device} threads={out['threads']} config={args.config} amp={args.amp}")
    print(f"params {out['params']:,}  masked patches {out['masked_patches']}")
    print(f"median {med:.1f} ms (min {out['min_ms']:.1f}) over {args.iters} iters after {args.warmup} warm-up")
    print(f"cpu time {out['cpu_ms_per_step']:.0f} ms/step   images/s {out['images_per_s']:.2f}   peak RSS {out['peak_rss_mib']:.0f} MiB")
    for n, v in out["phases_ms"]:
        print(f"  {n:16s} {v:9.1f} ms")
    if "peak_cuda_mib" in out:
        print(f"peak CUDA memory {out['peak_cuda_mib']:.0f} MiB on {out['gpu']}")


if __name__ == "__main__":
    main()
