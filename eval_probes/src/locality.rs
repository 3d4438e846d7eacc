//! Label-free health signals of the patch features (method spec §8 item 3), usable on any
//! images:
//!
//! - **locality**: how local each patch's cosine-similarity map is — the mean similarity
//!   to its 8 spatial neighbours minus the mean similarity to patches at least `far_radius`
//!   patches away (Chebyshev distance), and how consistent the maps of adjacent patches
//!   are (Pearson correlation of their similarity rows). Healthy dense features give
//!   compact, object-shaped maps; the degradation DINOv3 describes makes maps noisy and
//!   global.
//! - **dense correspondence** (§8 3c): two crops of the same image with known geometry (a
//!   shift of `shift` pixels, optionally a horizontal flip); the fraction of patches of the
//!   second view whose nearest neighbour in the first view lies within one patch of the
//!   true position. Purely positional features fail it by construction (the true position
//!   has a different grid index).
//! - **collapse indicators**: per-image patch-feature spread, CLS spread across images,
//!   the effective rank of the pooled patch covariance, and mean cos(CLS, patch).
//! - **Gram drift**: the §3.5 Gram MSE between two feature sets of the same images (e.g.
//!   the current teacher and a stored reference).

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{ProbeError, Result};
use crate::features::FeatureSet;
use crate::linalg::{covariance, effective_rank, l2_rows, symmetric_eigen, Mat};

/// Locality of the patch similarity structure.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LocalityResult {
    /// Mean cosine similarity of a patch to its 8-neighbourhood.
    pub neighbour_sim: f64,
    /// Mean cosine similarity to patches at Chebyshev distance >= `far_radius`.
    pub far_sim: f64,
    /// `neighbour_sim - far_sim`: the locality score (0 for position-free or collapsed
    /// features, larger for spatially coherent ones).
    pub score: f64,
    /// Mean Pearson correlation between the similarity maps of 4-adjacent patches.
    pub map_consistency: f64,
    /// The far distance used.
    pub far_radius: usize,
    /// Images scored.
    pub n_images: usize,
}

/// The default far distance for a grid: half the longer side, at least 2.
pub fn default_far_radius(grid: (usize, usize)) -> usize {
    (grid.0.max(grid.1) / 2).max(2)
}

/// Locality of the patch features of every image of `f`.
pub fn locality(f: &FeatureSet, far_radius: Option<usize>) -> Result<LocalityResult> {
    let (gh, gw) = f.grid;
    let p = gh * gw;
    let r = far_radius.unwrap_or_else(|| default_far_radius(f.grid));
    if p < 2 || r == 0 {
        return Err(ProbeError::shape(
            "locality",
            format!("grid {:?} with far radius {r}", f.grid),
        ));
    }
    let cheb = |a: usize, b: usize| (a / gw).abs_diff(b / gw).max((a % gw).abs_diff(b % gw));
    let per_image: Vec<Result<[f64; 6]>> = (0..f.n)
        .into_par_iter()
        .map(|i| {
            let x = Mat::new(l2_rows(f.patches_of(i), f.dim), p, f.dim)?;
            let g = x.mul_t(&x, None)?;
            let (mut near, mut n_near, mut far, mut n_far) = (0f64, 0f64, 0f64, 0f64);
            for a in 0..p {
                for b in 0..p {
                    let d = cheb(a, b);
                    if d == 1 {
                        near += f64::from(g[a * p + b]);
                        n_near += 1.0;
                    } else if d >= r {
                        far += f64::from(g[a * p + b]);
                        n_far += 1.0;
                    }
                }
            }
            let (mut cons, mut n_cons) = (0f64, 0f64);
            for a in 0..p {
                for b in [a + 1, a + gw] {
                    let adjacent = b < p && (b == a + gw || b % gw != 0);
                    if adjacent {
                        cons +=
                            row_correlation(&g[a * p..(a + 1) * p], &g[b * p..(b + 1) * p], a, b);
                        n_cons += 1.0;
                    }
                }
            }
            Ok([near, n_near, far, n_far, cons, n_cons])
        })
        .collect();
    let mut tot = [0f64; 6];
    for s in per_image {
        tot.iter_mut().zip(s?).for_each(|(t, v)| *t += v);
    }
    let div = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    let neighbour_sim = div(tot[0], tot[1]);
    let far_sim = div(tot[2], tot[3]);
    Ok(LocalityResult {
        neighbour_sim,
        far_sim,
        score: neighbour_sim - far_sim,
        map_consistency: div(tot[4], tot[5]),
        far_radius: r,
        n_images: f.n,
    })
}

/// Pearson correlation of two similarity rows, leaving out columns `a` and `b` (the
/// self-similarities that would inflate it). 0 when either row is constant.
fn row_correlation(ra: &[f32], rb: &[f32], a: usize, b: usize) -> f64 {
    let keep = |j: &usize| *j != a && *j != b;
    let idx: Vec<usize> = (0..ra.len()).filter(keep).collect();
    if idx.len() < 2 {
        return 0.0;
    }
    let n = idx.len() as f64;
    let ma = idx.iter().map(|&j| f64::from(ra[j])).sum::<f64>() / n;
    let mb = idx.iter().map(|&j| f64::from(rb[j])).sum::<f64>() / n;
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for &j in &idx {
        let (x, y) = (f64::from(ra[j]) - ma, f64::from(rb[j]) - mb);
        sab += x * y;
        saa += x * x;
        sbb += y * y;
    }
    if saa <= 1e-12 || sbb <= 1e-12 {
        0.0
    } else {
        sab / (saa * sbb).sqrt()
    }
}

/// Collapse indicators of a feature set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CollapseIndicators {
    /// Mean over images and dimensions of the std of the patch tokens within an image.
    pub patch_std: f64,
    /// Mean over dimensions of the std of the CLS token across images.
    pub cls_std: f64,
    /// Effective rank of the covariance of the pooled patch tokens (1 = collapsed to a
    /// line, D = isotropic).
    pub effective_rank: f64,
    /// Mean cosine similarity between an image's CLS token and its patch tokens.
    pub cls_patch_cos: f64,
    /// Patch rows used for the effective rank.
    pub rank_rows: usize,
}

/// Collapse indicators of `f`; the effective rank uses at most `max_rows` patch rows,
/// taken at an even stride.
pub fn collapse_indicators(f: &FeatureSet, max_rows: usize) -> Result<CollapseIndicators> {
    let (d, p) = (f.dim, f.n_patches());
    if f.n == 0 || d == 0 || p == 0 {
        return Err(ProbeError::shape(
            "collapse indicators",
            "empty feature set",
        ));
    }
    let std_of = |rows: &[f32], n: usize| -> f64 {
        let mut acc = 0.0;
        for j in 0..d {
            let m = (0..n).map(|r| f64::from(rows[r * d + j])).sum::<f64>() / n as f64;
            let v = (0..n)
                .map(|r| (f64::from(rows[r * d + j]) - m).powi(2))
                .sum::<f64>()
                / n as f64;
            acc += v.sqrt();
        }
        acc / d as f64
    };
    let patch_std = (0..f.n).map(|i| std_of(f.patches_of(i), p)).sum::<f64>() / f.n as f64;
    let cls_std = std_of(&f.cls, f.n);
    let total = f.n * p;
    let stride = total.div_ceil(max_rows.max(1)).max(1);
    let rows: Vec<f32> = (0..total)
        .step_by(stride)
        .flat_map(|r| f.patches[r * d..(r + 1) * d].iter().copied())
        .collect();
    let n_rows = rows.len() / d;
    let (cov, _) = covariance(&rows, n_rows, d)?;
    let (eig, _) = symmetric_eigen(&cov, d)?;
    let cls_n = l2_rows(&f.cls, d);
    let pat_n = l2_rows(&f.patches, d);
    let mut cos = 0f64;
    for i in 0..f.n {
        let c = &cls_n[i * d..(i + 1) * d];
        for r in 0..p {
            let o = (i * p + r) * d;
            cos += c
                .iter()
                .zip(&pat_n[o..o + d])
                .map(|(a, b)| f64::from(a * b))
                .sum::<f64>();
        }
    }
    Ok(CollapseIndicators {
        patch_std,
        cls_std,
        effective_rank: effective_rank(&eig),
        cls_patch_cos: cos / total as f64,
        rank_rows: n_rows,
    })
}

/// The Gram MSE of §3.5 between two feature sets of the same images: per image, the
/// patch tokens are L2-normalised, `G = X X^T`, and the mean of `(G_a - G_b)^2` is
/// averaged over images.
pub fn gram_drift(a: &FeatureSet, b: &FeatureSet) -> Result<f64> {
    if a.n != b.n || a.grid != b.grid || a.dim != b.dim || a.n == 0 {
        return Err(ProbeError::shape(
            "gram drift",
            format!(
                "{} images {:?} width {} vs {} images {:?} width {}",
                a.n, a.grid, a.dim, b.n, b.grid, b.dim
            ),
        ));
    }
    let p = a.n_patches();
    let mut total = 0f64;
    for i in 0..a.n {
        let xa = Mat::new(l2_rows(a.patches_of(i), a.dim), p, a.dim)?;
        let xb = Mat::new(l2_rows(b.patches_of(i), b.dim), p, b.dim)?;
        let (ga, gb) = (xa.mul_t(&xa, None)?, xb.mul_t(&xb, None)?);
        total += ga
            .iter()
            .zip(&gb)
            .map(|(u, v)| f64::from(u - v).powi(2))
            .sum::<f64>()
            / (p * p) as f64;
    }
    Ok(total / a.n as f64)
}

/// How the two views of the correspondence probe are cut.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorrespondenceConfig {
    /// Images used (the first of the set's test part); 0 disables the probe.
    #[serde(default = "d_corr_images")]
    pub images: usize,
    /// Offset of the second view in pixels along both axes (`None`: 1.5 patches, so true
    /// positions fall between grid cells).
    #[serde(default)]
    pub shift: Option<usize>,
    /// Mirror the second view horizontally.
    #[serde(default = "d_true")]
    pub flip: bool,
}

fn d_corr_images() -> usize {
    32
}
fn d_true() -> bool {
    true
}

impl Default for CorrespondenceConfig {
    fn default() -> Self {
        Self {
            images: d_corr_images(),
            shift: None,
            flip: true,
        }
    }
}

/// Result of the correspondence probe.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CorrespondenceResult {
    /// Fraction of scored patches matched within one patch of their true position.
    pub accuracy: f64,
    /// Patches scored (those whose true position lies inside the first view).
    pub n_patches: usize,
    /// Shift used, in pixels.
    pub shift: usize,
    /// Whether the second view was mirrored.
    pub flip: bool,
    /// Patch grid of each view.
    pub view_grid: (usize, usize),
}

/// The geometry of the two views cut from `size` images with patch `patch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ViewGeometry {
    /// Offset of view B in the image, pixels (both axes).
    pub shift: usize,
    /// View size (multiple of the patch size).
    pub view: (usize, usize),
    /// Patch size.
    pub patch: usize,
    /// View B mirrored horizontally.
    pub flip: bool,
}

impl ViewGeometry {
    /// Views of `size` images: A at the origin, B at `(shift, shift)`, both as large as
    /// fits, floored to whole patches.
    pub fn new(
        size: (usize, usize),
        patch: usize,
        shift: Option<usize>,
        flip: bool,
    ) -> Result<Self> {
        let shift = shift.unwrap_or(patch + patch / 2);
        let side = |s: usize| s.saturating_sub(shift) / patch.max(1) * patch;
        let view = (side(size.0), side(size.1));
        if patch == 0 || view.0 < 2 * patch || view.1 < 2 * patch {
            return Err(ProbeError::Config(vec![format!("correspondence shift {shift} leaves views of {}x{} for {}x{} images and patch {patch} (need at least 2x2 patches)", view.0, view.1, size.0, size.1)]));
        }
        Ok(Self {
            shift,
            view,
            patch,
            flip,
        })
    }

    /// The patch grid of each view.
    pub fn grid(&self) -> (usize, usize) {
        (self.view.0 / self.patch, self.view.1 / self.patch)
    }

    /// Cuts views A and B (`[n, 3, vh, vw]` each) from `images [n, 3, H, W]`.
    pub fn cut(&self, images: &[f32], n: usize, size: (usize, usize)) -> (Vec<f32>, Vec<f32>) {
        let (h, w) = size;
        let (vh, vw) = self.view;
        let mut a = Vec::with_capacity(n * 3 * vh * vw);
        let mut b = Vec::with_capacity(n * 3 * vh * vw);
        for i in 0..n {
            for c in 0..3 {
                let plane = &images[(i * 3 + c) * h * w..(i * 3 + c + 1) * h * w];
                for y in 0..vh {
                    a.extend_from_slice(&plane[y * w..y * w + vw]);
                    let row = &plane
                        [(y + self.shift) * w + self.shift..(y + self.shift) * w + self.shift + vw];
                    if self.flip {
                        b.extend(row.iter().rev());
                    } else {
                        b.extend_from_slice(row);
                    }
                }
            }
        }
        (a, b)
    }

    /// True position of view-B patch `(i, j)` in view-A patch coordinates (continuous).
    pub fn true_position(&self, i: usize, j: usize) -> (f64, f64) {
        let p = self.patch as f64;
        let yb = i as f64 * p + p / 2.0;
        let xv = j as f64 * p + p / 2.0;
        let xb = if self.flip {
            self.view.1 as f64 - xv
        } else {
            xv
        };
        let s = self.shift as f64;
        ((yb + s) / p - 0.5, (xb + s) / p - 0.5)
    }
}

/// Scores features of views A and B cut by `geo`.
pub fn correspondence_score(
    a: &FeatureSet,
    b: &FeatureSet,
    geo: &ViewGeometry,
) -> Result<CorrespondenceResult> {
    let grid = geo.grid();
    if a.grid != grid || b.grid != grid || a.n != b.n || a.dim != b.dim {
        return Err(ProbeError::shape(
            "correspondence",
            format!(
                "view features {:?} / {:?} for a {grid:?} grid",
                a.grid, b.grid
            ),
        ));
    }
    let (gh, gw) = grid;
    let p = gh * gw;
    let (mut hits, mut scored) = (0usize, 0usize);
    for i in 0..a.n {
        let xa = Mat::new(l2_rows(a.patches_of(i), a.dim), p, a.dim)?;
        let xb = Mat::new(l2_rows(b.patches_of(i), b.dim), p, b.dim)?;
        let sims = xb.mul_t(&xa, None)?;
        for bi in 0..gh {
            for bj in 0..gw {
                let (ty, tx) = geo.true_position(bi, bj);
                if ty < 0.0 || tx < 0.0 || ty > (gh - 1) as f64 || tx > (gw - 1) as f64 {
                    continue;
                }
                let row = &sims[(bi * gw + bj) * p..(bi * gw + bj + 1) * p];
                let nn = crate::linear::argmax(row) as usize;
                let (ay, ax) = ((nn / gw) as f64, (nn % gw) as f64);
                scored += 1;
                if (ay - ty).abs() <= 1.0 + 1e-9 && (ax - tx).abs() <= 1.0 + 1e-9 {
                    hits += 1;
                }
            }
        }
    }
    Ok(CorrespondenceResult {
        accuracy: if scored == 0 {
            0.0
        } else {
            hits as f64 / scored as f64
        },
        n_patches: scored,
        shift: geo.shift,
        flip: geo.flip,
        view_grid: grid,
    })
}

/// The correspondence probe on `images [n, 3, H, W]`: cuts the views, runs `extract` on
/// each (`extract(pixels, n, view_size)`) and scores them.
pub fn correspondence(
    images: &[f32],
    n: usize,
    size: (usize, usize),
    patch: usize,
    cfg: &CorrespondenceConfig,
    mut extract: impl FnMut(&[f32], usize, (usize, usize)) -> Result<FeatureSet>,
) -> Result<CorrespondenceResult> {
    if images.len() != n * 3 * size.0 * size.1 {
        return Err(ProbeError::shape(
            "correspondence images",
            format!(
                "{} values for {n} images of 3x{}x{}",
                images.len(),
                size.0,
                size.1
            ),
        ));
    }
    let geo = ViewGeometry::new(size, patch, cfg.shift, cfg.flip)?;
    let (va, vb) = geo.cut(images, n, size);
    let fa = extract(&va, n, geo.view)?;
    let fb = extract(&vb, n, geo.view)?;
    correspondence_score(&fa, &fb, &geo)
}
