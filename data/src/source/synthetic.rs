//! Procedural scenes: the built-in default source, needing no download.
//!
//! Image `i` is a pure function of (seed, i): a textured background (two low-saturation colours mixed
//! by smooth value noise and a grating) with 2-5 objects drawn back to front. Each object has one of
//! eight shape classes, a colour whose hue is tied to its class (with jitter), a random texture
//! (solid, stripes, checker, dots), a rotation and a size. Pixels are inside an object when their
//! centre is (no anti-aliasing), so the label map (0 = background, `class + 1` = object) is exact.
//! The image-level label is the class of the object with the largest visible area.

use std::f64::consts::PI;
use std::path::PathBuf;

use image::RgbImage;

use crate::error::DataError;
use crate::rng::{domain, KeyedRng};
use crate::source::{LabelMap, Sample, Source};

/// Default number of samples (the index space is unbounded; this is the epoch length).
pub(crate) const DEFAULT_LEN: u64 = 1 << 20;

/// Shape classes, in label order.
pub const SHAPE_CLASSES: [&str; 8] = [
    "disc", "square", "triangle", "ring", "star", "cross", "crescent", "bar",
];

/// Parameters of the scene generator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntheticConfig {
    /// Scene seed.
    pub seed: u64,
    /// Image side in pixels.
    pub size: u32,
    /// Number of samples.
    pub len: u64,
    /// Fewest objects per scene.
    pub min_objects: u32,
    /// Most objects per scene.
    pub max_objects: u32,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        SyntheticConfig {
            seed: 0,
            size: 96,
            len: DEFAULT_LEN,
            min_objects: 2,
            max_objects: 5,
        }
    }
}

/// The procedural scene source.
#[derive(Debug, Clone)]
pub struct SyntheticScenes {
    cfg: SyntheticConfig,
    classes: Vec<String>,
}

#[derive(Debug, Clone, Copy)]
enum Texture {
    Solid,
    Stripes { freq: f64, angle: f64 },
    Checker { freq: f64 },
    Dots { freq: f64 },
}

#[derive(Debug, Clone, Copy)]
struct Object {
    class: usize,
    cx: f64,
    cy: f64,
    radius: f64,
    cos: f64,
    sin: f64,
    color: [f64; 3],
    color2: [f64; 3],
    texture: Texture,
}

fn hsv_to_rgb(h: f64, s: f64, v: f64) -> [f64; 3] {
    let h = (h.rem_euclid(1.0)) * 6.0;
    let i = h.floor();
    let f = h - i;
    let (p, q, t) = (v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f)));
    match i as i32 % 6 {
        0 => [v, t, p],
        1 => [q, v, p],
        2 => [p, v, t],
        3 => [p, q, v],
        4 => [t, p, v],
        _ => [v, p, q],
    }
}

/// Inside test for shape `class` in object coordinates (unit circumradius).
pub(crate) fn inside(class: usize, u: f64, v: f64) -> bool {
    let r2 = u * u + v * v;
    match class {
        0 => r2 <= 1.0,
        1 => u.abs().max(v.abs()) <= 0.78,
        2 => v >= -0.5 && 3f64.sqrt() * u + v <= 1.0 && -(3f64.sqrt()) * u + v <= 1.0,
        3 => (0.3025..=1.0).contains(&r2),
        4 => {
            if r2 > 1.0 {
                return false;
            }
            // Five-pointed star, outer radius 1, inner 0.45: fold the angle onto [0, pi/5] from the
            // nearest outer vertex and test against the edge from (1, 0) to the inner vertex.
            let sector = 2.0 * PI / 5.0;
            let b = (v.atan2(u)).rem_euclid(sector);
            let b = b.min(sector - b);
            let rho = r2.sqrt();
            let (qx, qy) = (rho * b.cos(), rho * b.sin());
            let inner = 0.45;
            let (px, py) = (inner * (PI / 5.0).cos(), inner * (PI / 5.0).sin());
            // q is inside when it lies on the origin's side of that edge: cross((P2 - P1), (q - P1))
            // has the origin's sign, which is positive (py > 0).
            (px - 1.0) * qy - py * (qx - 1.0) >= 0.0
        }
        5 => (u.abs() <= 0.3 && v.abs() <= 0.95) || (v.abs() <= 0.3 && u.abs() <= 0.95),
        6 => r2 <= 1.0 && (u - 0.45) * (u - 0.45) + v * v > 0.64,
        _ => u.abs() <= 1.0 && v.abs() <= 0.3,
    }
}

impl Object {
    fn local(&self, x: f64, y: f64) -> (f64, f64) {
        let (dx, dy) = ((x - self.cx) / self.radius, (y - self.cy) / self.radius);
        (
            self.cos * dx + self.sin * dy,
            -self.sin * dx + self.cos * dy,
        )
    }

    fn color_at(&self, u: f64, v: f64) -> [f64; 3] {
        let second = match self.texture {
            Texture::Solid => false,
            Texture::Stripes { freq, angle } => {
                ((u * angle.cos() + v * angle.sin()) * freq * PI).sin() > 0.0
            }
            Texture::Checker { freq } => ((u * freq).floor() + (v * freq).floor()) as i64 % 2 == 0,
            Texture::Dots { freq } => {
                let (fu, fv) = (
                    (u * freq).rem_euclid(1.0) - 0.5,
                    (v * freq).rem_euclid(1.0) - 0.5,
                );
                fu * fu + fv * fv < 0.09
            }
        };
        let shade = 1.0 - 0.18 * (u * u + v * v);
        let c = if second { self.color2 } else { self.color };
        [c[0] * shade, c[1] * shade, c[2] * shade]
    }
}

impl SyntheticScenes {
    /// A generator with these parameters.
    pub fn new(cfg: SyntheticConfig) -> Self {
        let classes = SHAPE_CLASSES.iter().map(|s| s.to_string()).collect();
        SyntheticScenes { cfg, classes }
    }

    /// The parameters.
    pub fn config(&self) -> &SyntheticConfig {
        &self.cfg
    }

    /// Generates scene `index` (any u64; `len` only bounds epochs).
    pub fn generate(&self, index: u64) -> Sample {
        let size = self.cfg.size as usize;
        let s = size as f64;
        let mut rng = KeyedRng::new(&[self.cfg.seed, domain::SYNTHETIC, index]);

        // Background: two muted colours mixed by value noise and a grating.
        let h0 = rng.uniform();
        let c1 = hsv_to_rgb(
            h0,
            rng.uniform_range(0.05, 0.3),
            rng.uniform_range(0.3, 0.8),
        );
        let c2 = hsv_to_rgb(
            h0 + rng.uniform_range(-0.15, 0.15),
            rng.uniform_range(0.05, 0.3),
            rng.uniform_range(0.2, 0.9),
        );
        let grid = 3 + rng.below(5) as usize;
        let noise: Vec<f64> = (0..(grid + 1) * (grid + 1))
            .map(|_| rng.uniform())
            .collect();
        let g_angle = rng.uniform() * PI;
        let g_freq = rng.uniform_range(2.0, 10.0) / s;
        let g_amp = rng.uniform_range(0.0, 0.5);

        let n_objects = rng.int_inclusive(
            i64::from(self.cfg.min_objects),
            i64::from(self.cfg.max_objects),
        ) as usize;
        let mut objects = Vec::with_capacity(n_objects);
        for k in 0..n_objects {
            let class = rng.below(SHAPE_CLASSES.len() as u64) as usize;
            let radius = if k == 0 {
                rng.uniform_range(0.24, 0.36)
            } else {
                rng.uniform_range(0.09, 0.2)
            } * s;
            let margin = radius * 0.6;
            let cx = rng.uniform_range(margin, s - margin);
            let cy = rng.uniform_range(margin, s - margin);
            let theta = rng.uniform() * 2.0 * PI;
            let hue = class as f64 / SHAPE_CLASSES.len() as f64 + rng.uniform_range(-0.035, 0.035);
            let sat = rng.uniform_range(0.55, 1.0);
            let val = rng.uniform_range(0.5, 1.0);
            let color = hsv_to_rgb(hue, sat, val);
            let color2 = hsv_to_rgb(hue, sat * 0.8, val * rng.uniform_range(0.35, 0.65));
            let texture = match rng.below(4) {
                0 => Texture::Solid,
                1 => Texture::Stripes {
                    freq: rng.uniform_range(2.0, 4.0),
                    angle: rng.uniform() * PI,
                },
                2 => Texture::Checker {
                    freq: rng.uniform_range(1.5, 3.0),
                },
                _ => Texture::Dots {
                    freq: rng.uniform_range(2.0, 3.5),
                },
            };
            objects.push(Object {
                class,
                cx,
                cy,
                radius,
                cos: theta.cos(),
                sin: theta.sin(),
                color,
                color2,
                texture,
            });
        }

        let mut rgb = vec![0u8; size * size * 3];
        let mut labels = vec![0u8; size * size];
        let mut owner = vec![u8::MAX; size * size];
        for y in 0..size {
            for x in 0..size {
                let (fx, fy) = (
                    (x as f64 + 0.5) / s * grid as f64,
                    (y as f64 + 0.5) / s * grid as f64,
                );
                let (ix, iy) = (
                    (fx.floor() as usize).min(grid - 1),
                    (fy.floor() as usize).min(grid - 1),
                );
                let (tx, ty) = (fx - ix as f64, fy - iy as f64);
                let at = |i: usize, j: usize| noise[j * (grid + 1) + i];
                let n = (at(ix, iy) * (1.0 - tx) + at(ix + 1, iy) * tx) * (1.0 - ty)
                    + (at(ix, iy + 1) * (1.0 - tx) + at(ix + 1, iy + 1) * tx) * ty;
                let grating =
                    ((x as f64 * g_angle.cos() + y as f64 * g_angle.sin()) * g_freq * 2.0 * PI)
                        .sin();
                let t = (n + g_amp * 0.5 * grating).clamp(0.0, 1.0);
                let mut c = [
                    c1[0] * (1.0 - t) + c2[0] * t,
                    c1[1] * (1.0 - t) + c2[1] * t,
                    c1[2] * (1.0 - t) + c2[2] * t,
                ];
                let (px, py) = (x as f64 + 0.5, y as f64 + 0.5);
                for (k, obj) in objects.iter().enumerate() {
                    // Every shape lies within 1.11 radii of its centre (square and bar corners).
                    let reach = 1.12 * obj.radius;
                    if (px - obj.cx).abs() > reach || (py - obj.cy).abs() > reach {
                        continue;
                    }
                    let (u, v) = obj.local(px, py);
                    if inside(obj.class, u, v) {
                        c = obj.color_at(u, v);
                        labels[y * size + x] = obj.class as u8 + 1;
                        owner[y * size + x] = k as u8;
                    }
                }
                for ch in 0..3 {
                    rgb[(y * size + x) * 3 + ch] = (c[ch] * 255.0).round().clamp(0.0, 255.0) as u8;
                }
            }
        }
        // Fine noise so flat areas are not perfectly flat (does not touch the labels).
        for v in rgb.iter_mut() {
            let d = rng.below(7) as i16 - 3;
            *v = (i16::from(*v) + d).clamp(0, 255) as u8;
        }
        let mut visible = vec![0usize; objects.len()];
        for &o in &owner {
            if o != u8::MAX {
                visible[o as usize] += 1;
            }
        }
        let main = (0..objects.len())
            .max_by_key(|&k| (visible[k], std::cmp::Reverse(k)))
            .unwrap_or(0);
        Sample {
            image: RgbImage::from_raw(size as u32, size as u32, rgb).expect("size*size*3 bytes"),
            label: Some(objects[main].class as u32),
            label_map: Some(LabelMap {
                width: size as u32,
                height: size as u32,
                data: labels,
            }),
            id: format!("synthetic-{}/{index}", self.cfg.seed),
        }
    }
}

impl Source for SyntheticScenes {
    fn len(&self) -> Option<u64> {
        Some(self.cfg.len)
    }

    fn get(&self, index: u64) -> Result<Sample, DataError> {
        Ok(self.generate(index))
    }

    fn n_classes(&self) -> Option<usize> {
        Some(SHAPE_CLASSES.len())
    }

    fn class_names(&self) -> &[String] {
        &self.classes
    }

    fn has_label_maps(&self) -> bool {
        true
    }

    fn describe(&self) -> String {
        format!(
            "synthetic scenes (seed {}, {}x{} px, {} samples per epoch, {} shape classes)",
            self.cfg.seed,
            self.cfg.size,
            self.cfg.size,
            self.cfg.len,
            SHAPE_CLASSES.len()
        )
    }

    fn location(&self) -> PathBuf {
        PathBuf::from(format!("synthetic:{}", self.cfg.seed))
    }
}
