//! Pictures of features and of training: PCA of patch features as RGB, a patch's cosine-
//! similarity map over the image, several of them side by side, and metric curves with
//! the stage transitions marked (of one run, or of several runs in the same panels).
//! Renderers return `RgbImage`s; only [`write_png`], [`curves_png`] and [`runs_png`] touch
//! the file system, and only the path they are given.

use std::path::Path;
use std::sync::OnceLock;

use image::{Rgb, RgbImage};
use plotters::prelude::*;

use crate::dense::upsample_bilinear;
use crate::error::{ProbeError, Result};
use crate::linalg::{covariance, l2_rows, symmetric_eigen};

/// A 3-component PCA of patch features with a robust per-component range.
#[derive(Clone, Debug, PartialEq)]
pub struct PcaBasis {
    /// Feature width.
    pub dim: usize,
    /// Mean of the fitted rows.
    pub mean: Vec<f32>,
    /// The first three principal directions (unit vectors; fewer when `dim < 3`).
    pub components: Vec<Vec<f32>>,
    /// Variance along each component.
    pub variances: Vec<f64>,
    /// Per component: the 1st and 99th percentile of the fitted projections, mapped to 0 and 255.
    pub range: Vec<(f32, f32)>,
}

impl PcaBasis {
    /// Fits the basis to `rows [n, dim]` (eigenvectors of the covariance; each direction's
    /// sign is fixed so its largest entry is positive, so the colours are deterministic).
    pub fn fit(rows: &[f32], dim: usize) -> Result<Self> {
        if dim == 0 || rows.is_empty() || rows.len() % dim != 0 {
            return Err(ProbeError::shape(
                "PCA input",
                format!("{} values are not rows of width {dim}", rows.len()),
            ));
        }
        let n = rows.len() / dim;
        let (cov, mean) = covariance(rows, n, dim)?;
        let (vals, vecs) = symmetric_eigen(&cov, dim)?;
        let k = dim.min(3);
        let components: Vec<Vec<f32>> = vecs
            .into_iter()
            .take(k)
            .map(|v| v.into_iter().map(|x| x as f32).collect())
            .collect();
        let mut basis = PcaBasis {
            dim,
            mean,
            components,
            variances: vals.into_iter().take(k).collect(),
            range: vec![],
        };
        let proj = basis.project(rows);
        basis.range = (0..k)
            .map(|c| {
                let mut v: Vec<f32> = proj.iter().map(|p| p[c]).collect();
                v.sort_by(f32::total_cmp);
                let q = |f: f64| v[((v.len() - 1) as f64 * f).round() as usize];
                (q(0.01), q(0.99))
            })
            .collect();
        Ok(basis)
    }

    /// Coordinates of each row on the (up to three) components.
    pub fn project(&self, rows: &[f32]) -> Vec<[f32; 3]> {
        rows.chunks_exact(self.dim)
            .map(|r| {
                let mut out = [0f32; 3];
                for (o, comp) in out.iter_mut().zip(&self.components) {
                    *o = r
                        .iter()
                        .zip(&self.mean)
                        .zip(comp)
                        .map(|((x, m), c)| (x - m) * c)
                        .sum();
                }
                out
            })
            .collect()
    }

    /// The patches of one image as a `grid`-sized RGB image (one pixel per patch).
    pub fn rgb(&self, patches: &[f32], grid: (usize, usize)) -> Result<RgbImage> {
        check_grid(patches, grid, self.dim)?;
        let proj = self.project(patches);
        let mut img = RgbImage::new(grid.1 as u32, grid.0 as u32);
        for (i, p) in proj.iter().enumerate() {
            let mut px = [128u8; 3];
            for (c, &(lo, hi)) in self.range.iter().enumerate() {
                let t = if hi - lo > 1e-12 {
                    ((p[c] - lo) / (hi - lo)).clamp(0.0, 1.0)
                } else {
                    0.5
                };
                px[c] = (t * 255.0).round() as u8;
            }
            img.put_pixel((i % grid.1) as u32, (i / grid.1) as u32, Rgb(px));
        }
        Ok(img)
    }
}

fn check_grid(patches: &[f32], grid: (usize, usize), dim: usize) -> Result<()> {
    if grid.0 == 0 || grid.1 == 0 || patches.len() != grid.0 * grid.1 * dim {
        return Err(ProbeError::shape(
            "patch features",
            format!(
                "{} values for a {}x{} grid of width {dim}",
                patches.len(),
                grid.0,
                grid.1
            ),
        ));
    }
    Ok(())
}

fn dim_of(patches: &[f32], grid: (usize, usize)) -> Result<usize> {
    let p = grid.0 * grid.1;
    if p == 0 || patches.is_empty() || patches.len() % p != 0 {
        return Err(ProbeError::shape(
            "patch features",
            format!("{} values for a {}x{} grid", patches.len(), grid.0, grid.1),
        ));
    }
    Ok(patches.len() / p)
}

/// The first three principal components of one image's patch features `[P, D]` as RGB,
/// one pixel per patch (`grid.1` wide, `grid.0` high).
pub fn pca_rgb(patches: &[f32], grid: (usize, usize)) -> Result<RgbImage> {
    let dim = dim_of(patches, grid)?;
    PcaBasis::fit(patches, dim)?.rgb(patches, grid)
}

/// PCA pictures of several feature maps (e.g. one image at several resolutions) with one
/// basis fitted to all of them, so equal colours mean equal features across pictures.
pub fn pca_rgb_shared(maps: &[(&[f32], (usize, usize))]) -> Result<Vec<RgbImage>> {
    let Some(&(first, grid)) = maps.first() else {
        return Ok(vec![]);
    };
    let dim = dim_of(first, grid)?;
    let all: Vec<f32> = maps.iter().flat_map(|(p, _)| p.iter().copied()).collect();
    let basis = PcaBasis::fit(&all, dim)?;
    maps.iter().map(|(p, g)| basis.rgb(p, *g)).collect()
}

/// Cosine similarity of patch `index` to every patch of `patches [P, D]`.
pub fn patch_similarities(patches: &[f32], grid: (usize, usize), index: usize) -> Result<Vec<f32>> {
    let dim = dim_of(patches, grid)?;
    if index >= grid.0 * grid.1 {
        return Err(ProbeError::shape(
            "query patch",
            format!("index {index} outside a {}x{} grid", grid.0, grid.1),
        ));
    }
    let n = l2_rows(patches, dim);
    let q = &n[index * dim..(index + 1) * dim];
    Ok(n.chunks_exact(dim)
        .map(|r| r.iter().zip(q).map(|(a, b)| a * b).sum())
        .collect())
}

/// Viridis colour map (piecewise linear through 9 samples of the matplotlib map).
pub fn viridis(t: f32) -> Rgb<u8> {
    const STOPS: [[f32; 3]; 9] = [
        [68.0, 1.0, 84.0],
        [71.0, 44.0, 122.0],
        [59.0, 81.0, 139.0],
        [44.0, 113.0, 142.0],
        [33.0, 144.0, 141.0],
        [39.0, 173.0, 129.0],
        [92.0, 200.0, 99.0],
        [170.0, 220.0, 50.0],
        [253.0, 231.0, 37.0],
    ];
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    } * 8.0;
    let i = (t.floor() as usize).min(7);
    let f = t - i as f32;
    let c = |k: usize| (STOPS[i][k] * (1.0 - f) + STOPS[i + 1][k] * f).round() as u8;
    Rgb([c(0), c(1), c(2)])
}

/// The cosine-similarity map of the patch under pixel `point = (x, y)` of `image`,
/// colour-mapped (viridis over the map's min..max), bilinearly upsampled to the image and
/// blended over it, with the query patch outlined. Same size as `image`.
pub fn similarity_map(
    patches: &[f32],
    grid: (usize, usize),
    point: (u32, u32),
    image: &RgbImage,
) -> Result<RgbImage> {
    let (w, h) = image.dimensions();
    if point.0 >= w || point.1 >= h {
        return Err(ProbeError::shape(
            "query point",
            format!("({}, {}) outside a {w}x{h} image", point.0, point.1),
        ));
    }
    let gx = (point.0 as usize * grid.1) / w as usize;
    let gy = (point.1 as usize * grid.0) / h as usize;
    let sims = patch_similarities(patches, grid, gy * grid.1 + gx)?;
    let lo = sims.iter().copied().fold(f32::INFINITY, f32::min);
    let hi = sims.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let scaled: Vec<f32> = sims
        .iter()
        .map(|s| {
            if hi - lo > 1e-9 {
                (s - lo) / (hi - lo)
            } else {
                1.0
            }
        })
        .collect();
    let up = upsample_bilinear(&scaled, grid, 1, (h as usize, w as usize));
    let mut out = RgbImage::new(w, h);
    for (x, y, px) in out.enumerate_pixels_mut() {
        let c = viridis(up[y as usize * w as usize + x as usize]);
        let base = image.get_pixel(x, y);
        *px = Rgb(std::array::from_fn(|k| {
            (0.35 * f32::from(base[k]) + 0.65 * f32::from(c[k])).round() as u8
        }));
    }
    // Outline the query patch.
    let (x0, x1) = (
        (gx * w as usize / grid.1) as u32,
        (((gx + 1) * w as usize).div_ceil(grid.1) as u32).min(w) - 1,
    );
    let (y0, y1) = (
        (gy * h as usize / grid.0) as u32,
        (((gy + 1) * h as usize).div_ceil(grid.0) as u32).min(h) - 1,
    );
    for x in x0..=x1 {
        out.put_pixel(x, y0, Rgb([255, 64, 64]));
        out.put_pixel(x, y1, Rgb([255, 64, 64]));
    }
    for y in y0..=y1 {
        out.put_pixel(x0, y, Rgb([255, 64, 64]));
        out.put_pixel(x1, y, Rgb([255, 64, 64]));
    }
    Ok(out)
}

/// An image from normalised planes `[3, H, W]` (undoing `(x - mean) / std`).
pub fn denormalize(
    pixels: &[f32],
    size: (usize, usize),
    mean: [f32; 3],
    std: [f32; 3],
) -> Result<RgbImage> {
    let (h, w) = size;
    if pixels.len() != 3 * h * w {
        return Err(ProbeError::shape(
            "image planes",
            format!("{} values for 3x{h}x{w}", pixels.len()),
        ));
    }
    let mut img = RgbImage::new(w as u32, h as u32);
    for (x, y, px) in img.enumerate_pixels_mut() {
        let i = y as usize * w + x as usize;
        *px = Rgb(std::array::from_fn(|c| {
            ((pixels[c * h * w + i] * std[c] + mean[c]) * 255.0)
                .round()
                .clamp(0.0, 255.0) as u8
        }));
    }
    Ok(img)
}

/// Nearest-neighbour resize to `(width, height)` (keeps patch pictures blocky and exact).
pub fn resize_nearest(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    RgbImage::from_fn(width, height, |x, y| {
        *img.get_pixel(
            (u64::from(x) * u64::from(w) / u64::from(width.max(1))) as u32,
            (u64::from(y) * u64::from(h) / u64::from(height.max(1))) as u32,
        )
    })
}

/// Images in a row, top-aligned, separated by 8 white pixels, on white.
pub fn side_by_side(images: &[RgbImage]) -> RgbImage {
    const GAP: u32 = 8;
    let width =
        images.iter().map(|i| i.width()).sum::<u32>() + GAP * images.len().saturating_sub(1) as u32;
    let height = images.iter().map(|i| i.height()).max().unwrap_or(0);
    let mut out = RgbImage::from_pixel(width.max(1), height.max(1), Rgb([255, 255, 255]));
    let mut x0 = 0;
    for img in images {
        for (x, y, px) in img.enumerate_pixels() {
            out.put_pixel(x0 + x, y, *px);
        }
        x0 += img.width() + GAP;
    }
    out
}

/// How much of the colour variance of `img` the classes of `labels` (one per pixel,
/// row-major) explain: the correlation ratio `between-class / total` sum of squares over
/// the RGB channels, in [0, 1]. Near 1 when the picture segments the label map.
pub fn label_agreement(img: &RgbImage, labels: &[u8]) -> Result<f64> {
    let n = (img.width() * img.height()) as usize;
    if labels.len() != n || n == 0 {
        return Err(ProbeError::shape(
            "label agreement",
            format!("{} labels for {n} pixels", labels.len()),
        ));
    }
    let px: Vec<[f64; 3]> = img
        .pixels()
        .map(|p| std::array::from_fn(|c| f64::from(p[c])))
        .collect();
    let mean: [f64; 3] = std::array::from_fn(|c| px.iter().map(|p| p[c]).sum::<f64>() / n as f64);
    let mut sums = [[0f64; 3]; 256];
    let mut counts = [0usize; 256];
    for (p, &l) in px.iter().zip(labels) {
        counts[l as usize] += 1;
        (0..3).for_each(|c| sums[l as usize][c] += p[c]);
    }
    let total: f64 = px
        .iter()
        .map(|p| (0..3).map(|c| (p[c] - mean[c]).powi(2)).sum::<f64>())
        .sum();
    let between: f64 = (0..256)
        .filter(|&k| counts[k] > 0)
        .map(|k| {
            (0..3)
                .map(|c| counts[k] as f64 * (sums[k][c] / counts[k] as f64 - mean[c]).powi(2))
                .sum::<f64>()
        })
        .sum();
    Ok(if total > 0.0 { between / total } else { 0.0 })
}

/// Writes `img` as a PNG file.
pub fn write_png(img: &RgbImage, path: &Path) -> Result<()> {
    img.save_with_format(path, image::ImageFormat::Png)
        .map_err(|e| ProbeError::Write {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

/// One named series of `(step, value)` points.
pub type Series = (String, Vec<(u64, f64)>);

const FONT: &str = "dejavu-sans";

/// Line colours of the series (no red: red marks stage transitions).
const SERIES_COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
    RGBColor(140, 86, 75),
];

fn font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(
            FONT,
            FontStyle::Normal,
            include_bytes!("../assets/DejaVuSans.ttf"),
        )
        .is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(ProbeError::Plot(
            "the bundled DejaVu Sans font could not be parsed".into(),
        ))
    }
}

/// One run's curves, for drawing several runs (a branch and its control) in the same
/// panels.
#[derive(Clone, Debug, PartialEq)]
pub struct RunCurves {
    /// The run's name in the legend.
    pub label: String,
    /// Its series; panels pair series of the same name across runs.
    pub series: Vec<Series>,
    /// Its stage transitions `(step, label)`.
    pub transitions: Vec<(u64, String)>,
    /// The steps where its Gram teacher was refreshed from the EMA teacher.
    pub refreshes: Vec<u64>,
}

/// Colour of the Gram-teacher refresh marks (not a series colour, not red).
pub const REFRESH_COLOUR: RGBColor = RGBColor(227, 119, 194);

/// Renders every series in its own panel (stacked, sharing the step axis), with each
/// transition drawn as a vertical line labelled in the top panel. Non-finite values are
/// skipped. The picture is `width` wide and `panel_height` per series high.
pub fn render_curves(
    series: &[Series],
    transitions: &[(u64, String)],
    width: u32,
    panel_height: u32,
) -> Result<RgbImage> {
    let run = RunCurves {
        label: String::new(),
        series: series.to_vec(),
        transitions: transitions.to_vec(),
        refreshes: vec![],
    };
    render_runs(std::slice::from_ref(&run), width, panel_height)
}

/// One run's line in a panel: its colour, its legend label, its finite points.
type Line<'a> = (RGBColor, &'a str, Vec<(u64, f64)>);

/// [`render_curves`] for several runs: one panel per series name (in order of first
/// appearance, the first run's first), each run's line in its own colour with a legend in
/// the top panel, and every run's transitions marked (a transition that not every run
/// has is labelled with its run's name). Gram-teacher refreshes are thin pink lines,
/// labelled "G" in the top panel. With one run each panel has its own colour and there is
/// no legend.
pub fn render_runs(runs: &[RunCurves], width: u32, panel_height: u32) -> Result<RgbImage> {
    font()?;
    let mut names: Vec<&str> = vec![];
    for r in runs {
        for (name, _) in &r.series {
            if !names.contains(&name.as_str()) {
                names.push(name);
            }
        }
    }
    let mut transitions: Vec<(u64, String)> = vec![];
    for r in runs {
        for (step, label) in &r.transitions {
            let everywhere = runs
                .iter()
                .all(|o| o.transitions.iter().any(|t| t.0 == *step && &t.1 == label));
            let shown = if everywhere || runs.len() == 1 {
                label.clone()
            } else {
                format!("{}: {label}", r.label)
            };
            if !transitions.iter().any(|t| t.0 == *step && t.1 == shown) {
                transitions.push((*step, shown));
            }
        }
    }
    let mut refreshes: Vec<u64> = runs
        .iter()
        .flat_map(|r| r.refreshes.iter().copied())
        .collect();
    refreshes.sort_unstable();
    refreshes.dedup();
    let n_panels = names.len().max(1) as u32;
    let (w, h) = (width.max(200), panel_height.max(120) * n_panels);
    let steps = runs
        .iter()
        .flat_map(|r| r.series.iter())
        .flat_map(|(_, pts)| pts.iter().map(|p| p.0))
        .chain(transitions.iter().map(|t| t.0))
        .chain(refreshes.iter().copied());
    let (x_lo, x_hi) = steps.fold((u64::MAX, 0), |(lo, hi), s| (lo.min(s), hi.max(s)));
    let (x_lo, x_hi) = if x_lo > x_hi {
        (0, 1)
    } else if x_lo == x_hi {
        (x_lo, x_lo + 1)
    } else {
        (x_lo, x_hi)
    };
    let multi = runs.len() > 1;
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        let plot_err = |e: &dyn std::fmt::Display| ProbeError::Plot(e.to_string());
        root.fill(&WHITE).map_err(|e| plot_err(&e))?;
        let panels = root.split_evenly((n_panels as usize, 1));
        if names.is_empty() {
            names.push("(no series)");
        }
        for (k, (name, area)) in names.iter().zip(panels.iter()).enumerate() {
            // every run that has this series
            let lines: Vec<Line> = runs
                .iter()
                .enumerate()
                .filter_map(|(i, r)| {
                    let pts = &r.series.iter().find(|(n, _)| n == name)?.1;
                    let colour = SERIES_COLOURS[if multi { i } else { k } % SERIES_COLOURS.len()];
                    let finite = pts.iter().copied().filter(|p| p.1.is_finite()).collect();
                    Some((colour, r.label.as_str(), finite))
                })
                .collect();
            let (lo, hi) = lines
                .iter()
                .flat_map(|l| l.2.iter())
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
                    (lo.min(p.1), hi.max(p.1))
                });
            let (lo, hi) = if lo > hi {
                (0.0, 1.0)
            } else {
                let pad = ((hi - lo) * 0.08).max(1e-6 * hi.abs().max(1.0));
                (lo - pad, hi + pad)
            };
            let mut chart = ChartBuilder::on(area)
                .caption(*name, (FONT, 16))
                .margin(8)
                .margin_right(28)
                .x_label_area_size(28)
                .y_label_area_size(64)
                .build_cartesian_2d(x_lo as f64..x_hi as f64, lo..hi)
                .map_err(|e| plot_err(&e))?;
            chart
                .configure_mesh()
                .label_style((FONT, 12))
                .x_labels(8)
                .x_label_formatter(&|x| format!("{}", x.round() as i64))
                .y_labels(5)
                .light_line_style(RGBColor(235, 235, 235))
                .draw()
                .map_err(|e| plot_err(&e))?;
            for (colour, label, finite) in &lines {
                let colour = *colour;
                let drawn = chart
                    .draw_series(LineSeries::new(
                        finite.iter().map(|&(s, v)| (s as f64, v)),
                        colour.stroke_width(2),
                    ))
                    .map_err(|e| plot_err(&e))?;
                if multi && k == 0 {
                    drawn.label(*label).legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2))
                    });
                }
            }
            for &step in &refreshes {
                let x = step as f64;
                chart
                    .draw_series(std::iter::once(PathElement::new(
                        vec![(x, lo), (x, hi)],
                        REFRESH_COLOUR.stroke_width(1),
                    )))
                    .map_err(|e| plot_err(&e))?;
                if k == 0 {
                    chart
                        .draw_series(std::iter::once(Text::new(
                            " G",
                            (x, lo + (hi - lo) * 0.12),
                            (FONT, 12).into_font().color(&REFRESH_COLOUR),
                        )))
                        .map_err(|e| plot_err(&e))?;
                }
            }
            for (i, (step, label)) in transitions.iter().enumerate() {
                let x = *step as f64;
                chart
                    .draw_series(std::iter::once(PathElement::new(
                        vec![(x, lo), (x, hi)],
                        RED.stroke_width(1),
                    )))
                    .map_err(|e| plot_err(&e))?;
                if k == 0 {
                    // staggered, so that labels of nearby transitions stay readable
                    let y = hi - (hi - lo) * (0.05 + 0.1 * (i % 4) as f64);
                    chart
                        .draw_series(std::iter::once(Text::new(
                            format!(" {label}"),
                            (x, y),
                            (FONT, 12).into_font().color(&RED),
                        )))
                        .map_err(|e| plot_err(&e))?;
                }
            }
            if multi && k == 0 {
                chart
                    .configure_series_labels()
                    .position(SeriesLabelPosition::LowerLeft)
                    .label_font((FONT, 12))
                    .background_style(WHITE.mix(0.85))
                    .border_style(RGBColor(160, 160, 160))
                    .draw()
                    .map_err(|e| plot_err(&e))?;
            }
        }
        root.present().map_err(|e| plot_err(&e))?;
    }
    RgbImage::from_raw(w, h, buf)
        .ok_or_else(|| ProbeError::Plot("bitmap buffer has the wrong size".into()))
}

/// [`render_curves`] at 1000 px wide and 220 px per series, written as a PNG to `path`.
pub fn curves_png(series: &[Series], transitions: &[(u64, String)], path: &Path) -> Result<()> {
    write_png(&render_curves(series, transitions, 1000, 220)?, path)
}

/// [`render_runs`] at 1000 px wide and 220 px per series, written as a PNG to `path`.
pub fn runs_png(runs: &[RunCurves], path: &Path) -> Result<()> {
    write_png(&render_runs(runs, 1000, 220)?, path)
}
