//! Training curves drawn straight into a PNG: no plotting tool, no system fonts.
//!
//! Two panels side by side — training loss against epoch, and k-NN accuracy against epoch —
//! each with axes, light grid lines at "nice" tick values (1, 2 or 5 × 10^k steps), numeric tick
//! labels and a line plot. Text uses the embedded 5x7 bitmap font below (upper-case letters,
//! digits and a little punctuation; lower case is drawn as upper case, anything else as `?`).

use std::path::Path;

use anyhow::{Context, Result};
use image::{Rgb, RgbImage};

/// Size of the whole picture in pixels.
pub const IMAGE_WIDTH: u32 = 960;
pub const IMAGE_HEIGHT: u32 = 440;

const PANEL_WIDTH: i32 = IMAGE_WIDTH as i32 / 2;
/// Plot rectangle inside a panel: room on the left for tick labels, at the top for the titles,
/// at the bottom for tick labels and the axis name.
const PLOT_LEFT: i32 = 80;
const PLOT_RIGHT: i32 = PANEL_WIDTH - 24;
const PLOT_TOP: i32 = 80;
const PLOT_BOTTOM: i32 = IMAGE_HEIGHT as i32 - 60;
const TICK_LENGTH: i32 = 5;
const TARGET_TICKS: f64 = 5.0;

const BACKGROUND: Rgb<u8> = Rgb([255, 255, 255]);
const INK: Rgb<u8> = Rgb([30, 30, 30]);
const GRID: Rgb<u8> = Rgb([225, 225, 225]);
const LOSS_COLOUR: Rgb<u8> = Rgb([31, 119, 180]);
const ACCURACY_COLOUR: Rgb<u8> = Rgb([214, 39, 40]);

/// Draws the training curves and writes them as a PNG of [`IMAGE_WIDTH`] x [`IMAGE_HEIGHT`].
///
/// `loss` holds `(epoch, loss)` per logged step (epoch as a fraction, e.g. 2.5 = half-way
/// through the third epoch); `accuracy` holds `(epoch, k-NN accuracy)` per evaluation. Points with
/// a non-finite coordinate are skipped; an empty series leaves its panel with bare axes.
pub fn draw_curves(path: &Path, loss: &[(f64, f64)], accuracy: &[(f64, f64)], title: &str) -> Result<()> {
    render_curves(loss, accuracy, title)
        .save_with_format(path, image::ImageFormat::Png)
        .with_context(|| format!("writing the training-curve PNG {}", path.display()))
}

/// The picture [`draw_curves`] writes, in memory.
pub fn render_curves(loss: &[(f64, f64)], accuracy: &[(f64, f64)], title: &str) -> RgbImage {
    let mut image = RgbImage::from_pixel(IMAGE_WIDTH, IMAGE_HEIGHT, BACKGROUND);
    let title_scale = 3;
    draw_text(&mut image, (IMAGE_WIDTH as i32 - text_width(title, title_scale)) / 2, 12, title, title_scale, INK);
    draw_panel(&mut image, 0, "Training loss", loss, LOSS_COLOUR, false);
    draw_panel(&mut image, PANEL_WIDTH, "k-NN accuracy", accuracy, ACCURACY_COLOUR, true);
    image
}

/// One panel whose left edge is at `x0`: title, grid, axes, ticks, labels and the series.
/// `markers` puts a small square on every point (for sparse series such as per-epoch accuracy).
fn draw_panel(image: &mut RgbImage, x0: i32, name: &str, series: &[(f64, f64)], colour: Rgb<u8>, markers: bool) {
    let points: Vec<(f64, f64)> = series.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
    let x_axis = Axis::covering(points.iter().map(|p| p.0));
    let y_axis = Axis::covering(points.iter().map(|p| p.1));
    let (left, right) = (x0 + PLOT_LEFT, x0 + PLOT_RIGHT);
    let to_pixel = |(x, y): (f64, f64)| {
        let px = left as f64 + x_axis.fraction(x) * (right - left) as f64;
        let py = PLOT_BOTTOM as f64 - y_axis.fraction(y) * (PLOT_BOTTOM - PLOT_TOP) as f64;
        (px.round() as i32, py.round() as i32)
    };

    draw_text(image, left + ((right - left) - text_width(name, 2)) / 2, PLOT_TOP - 26, name, 2, INK);
    let axis_name = "epoch";
    draw_text(image, left + ((right - left) - text_width(axis_name, 2)) / 2, PLOT_BOTTOM + 34, axis_name, 2, INK);

    for tick in x_axis.ticks() {
        let (px, _) = to_pixel((tick, y_axis.low));
        draw_line(image, (px, PLOT_TOP), (px, PLOT_BOTTOM), GRID);
        draw_line(image, (px, PLOT_BOTTOM), (px, PLOT_BOTTOM + TICK_LENGTH), INK);
        let label = x_axis.label(tick);
        draw_text(image, px - text_width(&label, 2) / 2, PLOT_BOTTOM + TICK_LENGTH + 4, &label, 2, INK);
    }
    for tick in y_axis.ticks() {
        let (_, py) = to_pixel((x_axis.low, tick));
        draw_line(image, (left, py), (right, py), GRID);
        draw_line(image, (left - TICK_LENGTH, py), (left, py), INK);
        let label = y_axis.label(tick);
        draw_text(image, left - TICK_LENGTH - 4 - text_width(&label, 2), py - GLYPH_HEIGHT, &label, 2, INK);
    }
    draw_line(image, (left, PLOT_TOP), (left, PLOT_BOTTOM), INK);
    draw_line(image, (left, PLOT_BOTTOM), (right, PLOT_BOTTOM), INK);

    let pixels: Vec<(i32, i32)> = points.iter().map(|&p| to_pixel(p)).collect();
    for pair in pixels.windows(2) {
        draw_line(image, pair[0], pair[1], colour);
    }
    if markers || pixels.len() == 1 {
        for &(px, py) in &pixels {
            for dy in -1..=1 {
                for dx in -1..=1 {
                    put_pixel(image, px + dx, py + dy, colour);
                }
            }
        }
    }
}

/// A linear axis from `low` to `high` with ticks every `step`, both bounds on the tick grid.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Axis {
    low: f64,
    high: f64,
    step: f64,
}

impl Axis {
    /// The smallest axis on a nice tick grid that covers `values`; `[0, 1]` when there are none,
    /// and a unit-wide window around a constant value.
    fn covering(values: impl Iterator<Item = f64>) -> Axis {
        let (min, max) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
        let (min, max) = if min > max {
            (0.0, 1.0)
        } else if max - min <= 1e-12 * max.abs().max(1.0) {
            let half = 0.5 * max.abs().max(1.0);
            (min - half, max + half)
        } else {
            (min, max)
        };
        let step = nice_step((max - min) / TARGET_TICKS);
        // The small slack keeps a value that sits on a tick (up to rounding) from adding a step.
        let low = ((min / step) + 1e-9).floor() * step;
        let high = ((max / step) - 1e-9).ceil() * step;
        Axis { low, high, step }
    }

    /// Where `value` lies between `low` (0) and `high` (1).
    fn fraction(&self, value: f64) -> f64 {
        (value - self.low) / (self.high - self.low)
    }

    fn ticks(&self) -> Vec<f64> {
        let count = ((self.high - self.low) / self.step).round() as usize;
        (0..=count).map(|i| self.low + i as f64 * self.step).collect()
    }

    /// A tick value with as many decimals as the step needs (0.05 → 2, 20 → 0).
    fn label(&self, value: f64) -> String {
        let decimals = (-(self.step.log10() + 1e-9).floor()).max(0.0) as usize;
        let text = format!("{value:.decimals$}");
        // "-0.00" reads badly on an axis.
        if text.trim_start_matches('-').chars().all(|c| c == '0' || c == '.') {
            text.trim_start_matches('-').to_string()
        } else {
            text
        }
    }
}

/// The smallest of 1, 2, 5 or 10 × 10^k that is at least `rough`.
fn nice_step(rough: f64) -> f64 {
    let magnitude = 10f64.powf(rough.log10().floor());
    let multiple = [1.0, 2.0, 5.0, 10.0].into_iter().find(|m| m * magnitude >= rough * (1.0 - 1e-9)).unwrap_or(10.0);
    multiple * magnitude
}

fn put_pixel(image: &mut RgbImage, x: i32, y: i32, colour: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < image.width() && (y as u32) < image.height() {
        image.put_pixel(x as u32, y as u32, colour);
    }
}

/// Bresenham's line algorithm (all octants), end points included; pixels off the image are
/// dropped.
fn draw_line(image: &mut RgbImage, from: (i32, i32), to: (i32, i32), colour: Rgb<u8>) {
    let (mut x, mut y) = from;
    let (dx, dy) = ((to.0 - x).abs(), -(to.1 - y).abs());
    let (step_x, step_y) = ((to.0 - x).signum(), (to.1 - y).signum());
    let mut error = dx + dy;
    loop {
        put_pixel(image, x, y, colour);
        if (x, y) == to {
            break;
        }
        let doubled = 2 * error;
        if doubled >= dy {
            error += dy;
            x += step_x;
        }
        if doubled <= dx {
            error += dx;
            y += step_y;
        }
    }
}

const GLYPH_WIDTH: i32 = 5;
const GLYPH_HEIGHT: i32 = 7;
/// Horizontal advance per character: the glyph plus one blank column.
const GLYPH_ADVANCE: i32 = GLYPH_WIDTH + 1;

/// Width in pixels of `text` drawn at `scale`.
fn text_width(text: &str, scale: i32) -> i32 {
    (text.chars().count() as i32 * GLYPH_ADVANCE - 1).max(0) * scale
}

/// Draws `text` with its top-left corner at `(x, y)`, every font pixel a `scale` x `scale` square.
fn draw_text(image: &mut RgbImage, x: i32, y: i32, text: &str, scale: i32, colour: Rgb<u8>) {
    for (index, character) in text.chars().enumerate() {
        let rows = glyph(character);
        let left = x + index as i32 * GLYPH_ADVANCE * scale;
        for (row, bits) in rows.iter().enumerate() {
            for (column, bit) in bits.bytes().enumerate() {
                if bit != b'#' {
                    continue;
                }
                for sy in 0..scale {
                    for sx in 0..scale {
                        put_pixel(image, left + column as i32 * scale + sx, y + row as i32 * scale + sy, colour);
                    }
                }
            }
        }
    }
}

/// The 5x7 pattern of a character (`#` = ink); lower case maps to upper case, unknown to `?`.
fn glyph(character: char) -> &'static [&'static str; 7] {
    let wanted = character.to_ascii_uppercase();
    FONT.iter()
        .find(|(c, _)| *c == wanted)
        .or_else(|| FONT.iter().find(|(c, _)| *c == '?'))
        .map(|(_, rows)| rows)
        .unwrap()
}

/// A 5x7 bitmap font, one character per line, rows top to bottom.
#[rustfmt::skip]
const FONT: &[(char, [&str; 7])] = &[
    (' ', ["     ", "     ", "     ", "     ", "     ", "     ", "     "]),
    ('0', [" ### ", "#   #", "#  ##", "# # #", "##  #", "#   #", " ### "]),
    ('1', ["  #  ", " ##  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "]),
    ('2', [" ### ", "#   #", "    #", "   # ", "  #  ", " #   ", "#####"]),
    ('3', ["#####", "   # ", "  #  ", "   # ", "    #", "#   #", " ### "]),
    ('4', ["   # ", "  ## ", " # # ", "#  # ", "#####", "   # ", "   # "]),
    ('5', ["#####", "#    ", "#### ", "    #", "    #", "#   #", " ### "]),
    ('6', ["  ## ", " #   ", "#    ", "#### ", "#   #", "#   #", " ### "]),
    ('7', ["#####", "    #", "   # ", "  #  ", " #   ", " #   ", " #   "]),
    ('8', [" ### ", "#   #", "#   #", " ### ", "#   #", "#   #", " ### "]),
    ('9', [" ### ", "#   #", "#   #", " ####", "    #", "   # ", " ##  "]),
    ('.', ["     ", "     ", "     ", "     ", "     ", " ##  ", " ##  "]),
    (',', ["     ", "     ", "     ", "     ", " ##  ", "  #  ", " #   "]),
    (':', ["     ", " ##  ", " ##  ", "     ", " ##  ", " ##  ", "     "]),
    ('-', ["     ", "     ", "     ", " ### ", "     ", "     ", "     "]),
    ('+', ["     ", "  #  ", "  #  ", "#####", "  #  ", "  #  ", "     "]),
    ('=', ["     ", "     ", "#####", "     ", "#####", "     ", "     "]),
    ('_', ["     ", "     ", "     ", "     ", "     ", "     ", "#####"]),
    ('/', ["     ", "    #", "   # ", "  #  ", " #   ", "#    ", "     "]),
    ('%', ["##   ", "##  #", "   # ", "  #  ", " #   ", "#  ##", "   ##"]),
    ('(', ["   # ", "  #  ", " #   ", " #   ", " #   ", "  #  ", "   # "]),
    (')', [" #   ", "  #  ", "   # ", "   # ", "   # ", "  #  ", " #   "]),
    ('[', [" ### ", " #   ", " #   ", " #   ", " #   ", " #   ", " ### "]),
    (']', [" ### ", "   # ", "   # ", "   # ", "   # ", "   # ", " ### "]),
    ('?', [" ### ", "#   #", "    #", "   # ", "  #  ", "     ", "  #  "]),
    ('A', [" ### ", "#   #", "#   #", "#####", "#   #", "#   #", "#   #"]),
    ('B', ["#### ", "#   #", "#   #", "#### ", "#   #", "#   #", "#### "]),
    ('C', [" ### ", "#   #", "#    ", "#    ", "#    ", "#   #", " ### "]),
    ('D', ["###  ", "#  # ", "#   #", "#   #", "#   #", "#  # ", "###  "]),
    ('E', ["#####", "#    ", "#    ", "#### ", "#    ", "#    ", "#####"]),
    ('F', ["#####", "#    ", "#    ", "#### ", "#    ", "#    ", "#    "]),
    ('G', [" ### ", "#   #", "#    ", "# ###", "#   #", "#   #", " ####"]),
    ('H', ["#   #", "#   #", "#   #", "#####", "#   #", "#   #", "#   #"]),
    ('I', [" ### ", "  #  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "]),
    ('J', ["  ###", "   # ", "   # ", "   # ", "   # ", "#  # ", " ##  "]),
    ('K', ["#   #", "#  # ", "# #  ", "##   ", "# #  ", "#  # ", "#   #"]),
    ('L', ["#    ", "#    ", "#    ", "#    ", "#    ", "#    ", "#####"]),
    ('M', ["#   #", "## ##", "# # #", "# # #", "#   #", "#   #", "#   #"]),
    ('N', ["#   #", "#   #", "##  #", "# # #", "#  ##", "#   #", "#   #"]),
    ('O', [" ### ", "#   #", "#   #", "#   #", "#   #", "#   #", " ### "]),
    ('P', ["#### ", "#   #", "#   #", "#### ", "#    ", "#    ", "#    "]),
    ('Q', [" ### ", "#   #", "#   #", "#   #", "# # #", "#  # ", " ## #"]),
    ('R', ["#### ", "#   #", "#   #", "#### ", "# #  ", "#  # ", "#   #"]),
    ('S', [" ####", "#    ", "#    ", " ### ", "    #", "    #", "#### "]),
    ('T', ["#####", "  #  ", "  #  ", "  #  ", "  #  ", "  #  ", "  #  "]),
    ('U', ["#   #", "#   #", "#   #", "#   #", "#   #", "#   #", " ### "]),
    ('V', ["#   #", "#   #", "#   #", "#   #", "#   #", " # # ", "  #  "]),
    ('W', ["#   #", "#   #", "#   #", "# # #", "# # #", "# # #", " # # "]),
    ('X', ["#   #", "#   #", " # # ", "  #  ", " # # ", "#   #", "#   #"]),
    ('Y', ["#   #", "#   #", " # # ", "  #  ", "  #  ", "  #  ", "  #  "]),
    ('Z', ["#####", "    #", "   # ", "  #  ", " #   ", "#    ", "#####"]),
];

#[cfg(test)]
mod tests {
    use super::*;

    /// Pixels of `colour` inside the plot rectangle of the panel starting at `x0`.
    fn coloured_pixels(image: &RgbImage, x0: i32, colour: Rgb<u8>) -> Vec<(i32, i32)> {
        let mut found = Vec::new();
        for y in PLOT_TOP..=PLOT_BOTTOM {
            for x in x0 + PLOT_LEFT..=x0 + PLOT_RIGHT {
                if *image.get_pixel(x as u32, y as u32) == colour {
                    found.push((x, y));
                }
            }
        }
        found
    }

    #[test]
    fn writes_a_png_of_the_expected_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("curves.png");
        let loss: Vec<(f64, f64)> = (0..100).map(|i| (i as f64 / 20.0, 5.0 / (1.0 + i as f64 / 10.0))).collect();
        let accuracy = [(1.0, 0.61), (2.0, 0.70), (3.0, 0.74), (4.0, 0.76), (5.0, 0.78)];
        draw_curves(&path, &loss, &accuracy, "SimCLR on Fashion-MNIST").unwrap();

        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
        let decoded = image::open(&path).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (IMAGE_WIDTH, IMAGE_HEIGHT));
    }

    #[test]
    fn an_unwritable_path_names_the_path() {
        let error = draw_curves(Path::new("/nonexistent-dir/curves.png"), &[], &[], "x").unwrap_err();
        assert!(format!("{error:#}").contains("/nonexistent-dir/curves.png"), "{error:#}");
    }

    /// A constant loss sits mid-way up its axis (the axis is a unit window around a constant):
    /// every loss-coloured pixel is on that one row, and the row is covered from the first
    /// point (left edge) to the last (right edge).
    #[test]
    fn a_flat_loss_is_a_horizontal_line_through_the_middle() {
        let loss: Vec<(f64, f64)> = (0..=40).map(|i| (i as f64 / 10.0, 2.0)).collect();
        let image = render_curves(&loss, &[], "flat");
        let pixels = coloured_pixels(&image, 0, LOSS_COLOUR);
        let middle_row = (PLOT_TOP + PLOT_BOTTOM) / 2;
        assert!(pixels.iter().all(|&(_, y)| (y - middle_row).abs() <= 1), "rows {:?}", pixels.first());
        let row = pixels[0].1;
        for x in PLOT_LEFT..=PLOT_RIGHT {
            assert!(pixels.contains(&(x, row)), "gap at x = {x}");
        }
    }

    /// Accuracy rising linearly from (1, 0.5) to (5, 0.9): both ranges fall on nice ticks, so the
    /// line runs from the plot's bottom-left corner to its top-right corner through the centre,
    /// and no accuracy pixel strays from that diagonal.
    #[test]
    fn a_rising_accuracy_is_the_plot_diagonal() {
        let accuracy: Vec<(f64, f64)> = (1..=5).map(|e| (e as f64, 0.4 + 0.1 * e as f64)).collect();
        let image = render_curves(&[], &accuracy, "rising");
        let (left, right) = (PANEL_WIDTH + PLOT_LEFT, PANEL_WIDTH + PLOT_RIGHT);
        let pixels = coloured_pixels(&image, PANEL_WIDTH, ACCURACY_COLOUR);
        let centre = ((left + right) / 2, (PLOT_TOP + PLOT_BOTTOM) / 2);
        for corner in [(left, PLOT_BOTTOM), (right, PLOT_TOP), centre] {
            assert!(pixels.contains(&corner), "no accuracy pixel at {corner:?}");
        }
        let slope = (PLOT_TOP - PLOT_BOTTOM) as f64 / (right - left) as f64;
        for &(x, y) in &pixels {
            let on_line = PLOT_BOTTOM as f64 + slope * (x - left) as f64;
            // Markers are 3x3 squares around the data points; the line itself is within a pixel.
            assert!((y as f64 - on_line).abs() <= 2.5, "({x}, {y}) is off the diagonal");
        }
    }

    #[test]
    fn axes_use_nice_ticks() {
        let axis = Axis::covering([0.13, 0.87].into_iter());
        assert_eq!((axis.low, axis.high, axis.step), (0.0, 1.0, 0.2));
        assert_eq!(axis.ticks().len(), 6);
        assert_eq!(axis.label(0.4), "0.4");
        let axis = Axis::covering([1.0, 5.0].into_iter());
        assert_eq!((axis.low, axis.high, axis.step), (1.0, 5.0, 1.0));
        assert_eq!(axis.label(3.0), "3");
        let axis = Axis::covering([2.0, 2.0].into_iter());
        assert_eq!((axis.low, axis.high), (1.0, 3.0));
        assert_eq!(Axis::covering(std::iter::empty()).low, 0.0);
        assert_eq!(nice_step(0.03), 0.05);
        assert_eq!(nice_step(7.0), 10.0);
    }

    /// Every glyph is 5 columns of `#` or space; the font covers digits and letters.
    #[test]
    fn font_glyphs_are_well_formed() {
        for (character, rows) in FONT {
            assert!(rows.iter().all(|r| r.len() == 5 && r.bytes().all(|b| b == b'#' || b == b' ')), "{character:?}");
        }
        for character in ('0'..='9').chain('A'..='Z') {
            assert!(FONT.iter().any(|(c, _)| *c == character), "{character:?} missing");
        }
        assert_eq!(glyph('e'), glyph('E'));
        assert_eq!(glyph('~'), glyph('?'));
    }
}
