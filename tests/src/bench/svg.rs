//! A small, self-contained SVG writer for the benchmark report: a horizontal grouped bar chart
//! and a line chart. Each is a standalone SVG 1.1 document 800 px wide, in a sans-serif font,
//! with no scripts, stylesheets, fonts, images or links: nothing outside the file.
//!
//! All text is XML-escaped. Values that cannot be placed (NaN, ±inf, and values ≤ 0 on a log
//! axis) are never drawn; the chart says how many were left out, and no coordinate is ever
//! NaN or infinite.

use std::fmt::Write as _;

/// One bar: its label and value; `group` labels a cluster of bars (e.g. "1k Services").
#[derive(Clone, Debug, PartialEq)]
pub struct Bar {
    pub group: String,
    pub label: String,
    pub value: f64,
}

/// One line of a [`line_chart`]: its legend name and its (x, y) points, in any order.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// Document width in px; heights follow the content.
const WIDTH: f64 = 800.0;
/// Fills and strokes, in the order labels (bar chart) or series (line chart) first appear.
/// Tableau 10: distinguishable, and readable on white.
const PALETTE: [&str; 10] = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac",
];
const GRID: &str = "#e3e3e3";
const AXIS: &str = "#555555";
const MUTED: &str = "#777777";
/// Where the first row (bar chart) or the plot (line chart) starts, below the title.
const TOP: f64 = 46.0;
/// Labels longer than this many characters are shortened with "…".
const MAX_LABEL_CHARS: usize = 34;
/// Rough width of a character at font-size 12, for laying out label columns.
const CHAR_W: f64 = 7.0;

/// Horizontal grouped bar chart: one row per bar, grouped under group headings, bars scaled to
/// the largest value (or log scale when `log` is true and values span more than 100x),
/// value printed at the end of each bar with `unit`, distinct fill per label (a fixed palette,
/// the same label always the same colour), title on top, axis note with the unit and the scale.
///
/// Groups appear in the order they first occur in `bars`, and bars within a group in their
/// order in `bars`. A label's colour is the palette entry of its rank among the distinct labels
/// in order of first occurrence (cycling after ten labels). Bars with an empty group get no
/// heading. A bar whose value cannot be drawn keeps its row, with a note instead of a bar.
pub fn bar_chart(title: &str, unit: &str, bars: &[Bar], log: bool) -> String {
    let positive: Vec<f64> = bars
        .iter()
        .map(|b| b.value)
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    let min_pos = positive.iter().copied().fold(f64::INFINITY, f64::min);
    let max_pos = positive.iter().copied().fold(0.0, f64::max);
    let use_log = log && !positive.is_empty() && max_pos / min_pos > 100.0;
    let axis = if use_log {
        // From the decade strictly below the smallest value, so that every bar has some length.
        let e_lo = log10(min_pos).ceil() - 1.0;
        let e_hi = log10(max_pos).ceil().max(e_lo + 1.0);
        Axis::log(e_lo, e_hi)
    } else {
        // Scaled to the largest value, so that it spans the whole plot.
        let max = bars
            .iter()
            .map(|b| b.value)
            .filter(|v| v.is_finite())
            .fold(0.0, f64::max);
        Axis::linear(0.0, if max > 0.0 { max } else { 1.0 }, false)
    };

    let mut groups: Vec<(&str, Vec<&Bar>)> = Vec::new();
    let mut labels: Vec<&str> = Vec::new();
    for b in bars {
        match groups.iter_mut().find(|(g, _)| *g == b.group) {
            Some((_, members)) => members.push(b),
            None => groups.push((&b.group, vec![b])),
        }
        if !labels.contains(&b.label.as_str()) {
            labels.push(&b.label);
        }
    }
    let colour = |label: &str| {
        let i = labels.iter().position(|l| *l == label).unwrap_or(0);
        PALETTE[i % PALETTE.len()]
    };

    let longest = bars
        .iter()
        .map(|b| b.label.chars().count())
        .max()
        .unwrap_or(0)
        .min(MAX_LABEL_CHARS);
    let label_w = (longest as f64 * CHAR_W).clamp(60.0, MAX_LABEL_CHARS as f64 * CHAR_W);
    let x0 = 10.0 + label_w + 10.0;
    // Room on the right for the value printed after the longest bar.
    let plot_w = WIDTH - 120.0 - x0;
    let with_unit = |v: f64| {
        if unit.is_empty() {
            fmt_value(v)
        } else {
            format!("{} {unit}", fmt_value(v))
        }
    };

    let mut rows = String::new();
    let mut y = TOP;
    let (mut not_finite, mut not_positive) = (0usize, 0usize);
    if bars.is_empty() {
        text(
            &mut rows,
            x0,
            y + 14.0,
            &format!(r#"fill="{MUTED}""#),
            "no data",
        );
        y += 20.0;
    }
    for (group, members) in &groups {
        if !group.is_empty() {
            text(&mut rows, 10.0, y + 17.0, r#"font-weight="bold""#, group);
            y += 24.0;
        }
        for b in members {
            let label = shorten(&b.label, MAX_LABEL_CHARS);
            text(
                &mut rows,
                x0 - 8.0,
                y + 14.0,
                r#"text-anchor="end""#,
                &label,
            );
            let muted = format!(r#"fill="{MUTED}""#);
            if !b.value.is_finite() {
                not_finite += 1;
                text(&mut rows, x0 + 4.0, y + 14.0, &muted, "no value");
            } else if !axis.accepts(b.value) {
                not_positive += 1;
                let note = format!("{} (not drawn on the log scale)", with_unit(b.value));
                text(&mut rows, x0 + 4.0, y + 14.0, &muted, &note);
            } else {
                let w = axis.frac(b.value) * plot_w;
                let _ = writeln!(
                    rows,
                    r#"<rect class="bar" x="{}" y="{}" width="{}" height="14" fill="{}"/>"#,
                    num(x0),
                    num(y + 3.0),
                    num(w),
                    colour(&b.label),
                );
                text(&mut rows, x0 + w + 6.0, y + 14.0, "", &with_unit(b.value));
            }
            y += 20.0;
        }
    }
    let bottom = y + 4.0;

    let mut body = String::new();
    for (frac, label) in &axis.ticks {
        let x = x0 + frac * plot_w;
        line(&mut body, (x, TOP), (x, bottom), GRID);
        let attrs = format!(r#"text-anchor="middle" fill="{AXIS}""#);
        text(&mut body, x, bottom + 15.0, &attrs, label);
    }
    line(&mut body, (x0, TOP), (x0, bottom), AXIS);
    line(&mut body, (x0, bottom), (x0 + plot_w, bottom), AXIS);
    body.push_str(&rows);

    let scale = if use_log {
        "log scale (each gridline ×10)"
    } else if log {
        "linear scale (values span 100× or less)"
    } else {
        "linear scale"
    };
    let mut notes = vec![if unit.is_empty() {
        format!("Bars: {scale}.")
    } else {
        format!("Bars in {unit}, {scale}.")
    }];
    if not_finite > 0 {
        notes.push(format!(
            "{} without a finite value not drawn.",
            count(not_finite, "bar")
        ));
    }
    if not_positive > 0 {
        notes.push(format!(
            "{} ≤ 0 not drawn on the log scale.",
            count(not_positive, "bar")
        ));
    }
    let mut y = bottom + 38.0;
    for note in &notes {
        let attrs = format!(r#"fill="{AXIS}""#);
        text(&mut body, 10.0, y, &attrs, note);
        y += 18.0;
    }
    document(title, y - 4.0, &body)
}

/// Line chart: x values (numeric, plotted on a log10 axis when `log_x`) and one series per
/// name, with markers and a legend; y from 0 to the max.
///
/// Each series gets the palette colour and marker shape (circle, square, triangle, diamond) of
/// its index; its points are joined in order of x. The y axis runs from 0 (or the smallest y,
/// if negative) to the largest y rounded up to a gridline.
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    log_x: bool,
) -> String {
    let drawable = |&(x, y): &(f64, f64)| x.is_finite() && y.is_finite() && (!log_x || x > 0.0);
    let (mut not_finite, mut not_positive) = (0usize, 0usize);
    for &(x, y) in series.iter().flat_map(|s| &s.points) {
        if !x.is_finite() || !y.is_finite() {
            not_finite += 1;
        } else if log_x && x <= 0.0 {
            not_positive += 1;
        }
    }
    let points = || {
        series
            .iter()
            .flat_map(|s| &s.points)
            .filter(move |p| drawable(p))
    };
    let (x_min, x_max) = points().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
        (lo.min(p.0), hi.max(p.0))
    });
    let (y_min, y_max) =
        points().fold((0.0_f64, 0.0_f64), |(lo, hi), p| (lo.min(p.1), hi.max(p.1)));
    let any = points().next().is_some();

    let x_axis = if log_x {
        if any {
            let e_lo = log10(x_min).floor();
            let e_hi = log10(x_max).ceil().max(e_lo + 1.0);
            Axis::log(e_lo, e_hi)
        } else {
            Axis::log(0.0, 1.0)
        }
    } else if any && x_max > x_min {
        Axis::linear(x_min, x_max, true)
    } else if any {
        Axis::linear(x_min - 1.0, x_max + 1.0, true)
    } else {
        Axis::linear(0.0, 1.0, true)
    };
    let y_axis = Axis::linear(y_min, if y_max > y_min { y_max } else { 1.0 }, true);

    let left = 72.0;
    let legend_x = WIDTH - 165.0;
    let plot_w = legend_x - 20.0 - left;
    let bottom = (TOP + 20.0 * series.len() as f64 + 10.0).max(TOP + 320.0);
    let plot_h = bottom - TOP;
    let px = |x: f64| left + x_axis.frac(x) * plot_w;
    let py = |y: f64| bottom - y_axis.frac(y) * plot_h;

    let mut body = String::new();
    let tick_attrs = format!(r#"text-anchor="middle" fill="{AXIS}""#);
    for (frac, label) in &x_axis.ticks {
        let x = left + frac * plot_w;
        line(&mut body, (x, TOP), (x, bottom), GRID);
        text(&mut body, x, bottom + 16.0, &tick_attrs, label);
    }
    let tick_attrs = format!(r#"text-anchor="end" fill="{AXIS}""#);
    for (frac, label) in &y_axis.ticks {
        let y = bottom - frac * plot_h;
        line(&mut body, (left, y), (left + plot_w, y), GRID);
        text(&mut body, left - 6.0, y + 4.0, &tick_attrs, label);
    }
    line(&mut body, (left, TOP), (left, bottom), AXIS);
    line(&mut body, (left, bottom), (left + plot_w, bottom), AXIS);
    let x_title = if log_x {
        format!("{x_label} (log scale)")
    } else {
        x_label.to_owned()
    };
    text(
        &mut body,
        left + plot_w / 2.0,
        bottom + 38.0,
        r#"text-anchor="middle""#,
        &x_title,
    );
    let (yx, yy) = (18.0, TOP + plot_h / 2.0);
    let rotate = format!(
        r#"text-anchor="middle" transform="rotate(-90 {} {})""#,
        num(yx),
        num(yy)
    );
    text(&mut body, yx, yy, &rotate, y_label);
    if !any {
        let attrs = format!(r#"text-anchor="middle" fill="{MUTED}""#);
        text(
            &mut body,
            left + plot_w / 2.0,
            TOP + plot_h / 2.0,
            &attrs,
            "no data",
        );
    }

    for (i, s) in series.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let mut pts: Vec<(f64, f64)> = s.points.iter().copied().filter(drawable).collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        if pts.len() >= 2 {
            let coords: Vec<String> = pts
                .iter()
                .map(|&(x, y)| format!("{},{}", num(px(x)), num(py(y))))
                .collect();
            let _ = writeln!(
                body,
                r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2" stroke-linejoin="round"/>"#,
                coords.join(" ")
            );
        }
        for &(x, y) in &pts {
            marker(&mut body, i, px(x), py(y), colour);
        }
        // Legend entry: a stroke with the marker on it, then the name.
        let ly = TOP + 10.0 + 20.0 * i as f64;
        line_styled(
            &mut body,
            (legend_x, ly),
            (legend_x + 24.0, ly),
            colour,
            "2",
        );
        marker(&mut body, i, legend_x + 12.0, ly, colour);
        text(
            &mut body,
            legend_x + 30.0,
            ly + 4.0,
            "",
            &shorten(&s.name, 18),
        );
    }

    let mut notes = Vec::new();
    if not_finite > 0 {
        notes.push(format!(
            "{} without finite coordinates not drawn.",
            count(not_finite, "point")
        ));
    }
    if not_positive > 0 {
        notes.push(format!(
            "{} with x ≤ 0 not drawn on the log axis.",
            count(not_positive, "point")
        ));
    }
    let mut y = bottom + 62.0;
    for note in &notes {
        let attrs = format!(r#"fill="{AXIS}""#);
        text(&mut body, 10.0, y, &attrs, note);
        y += 18.0;
    }
    document(title, y - 4.0, &body)
}

/// One axis: where values fall along it (as a fraction of its length) and its gridlines.
struct Axis {
    /// Ends, in axis units: the value itself, or its log10 on a log axis.
    lo: f64,
    hi: f64,
    log: bool,
    /// Gridlines: fraction of the length, and label.
    ticks: Vec<(f64, String)>,
}

impl Axis {
    /// A linear axis from `lo` to `hi` (`hi > lo`), gridlines at multiples of a 1-2-5 step.
    /// With `round_out`, the ends move out to gridlines; otherwise they stay as given.
    fn linear(lo: f64, hi: f64, round_out: bool) -> Axis {
        let step = nice_step((hi - lo) / 5.0);
        let (lo, hi) = if round_out {
            ((lo / step).floor() * step, (hi / step).ceil() * step)
        } else {
            (lo, hi)
        };
        let mut axis = Axis {
            lo,
            hi,
            log: false,
            ticks: Vec::new(),
        };
        let first = (lo / step - 1e-9).ceil();
        let last = (hi / step + 1e-9).floor();
        if first.is_finite() && last.is_finite() && last - first <= 50.0 {
            let big = lo.abs().max(hi.abs()) >= 1e4;
            let mut k = first;
            while k <= last {
                let v = k * step;
                axis.ticks.push((axis.frac(v), fmt_tick(v, step, big)));
                k += 1.0;
            }
        }
        axis
    }

    /// A log10 axis over whole decades 10^e_lo to 10^e_hi, gridlines on decades (every
    /// few decades when there are more than ten).
    fn log(e_lo: f64, e_hi: f64) -> Axis {
        let mut axis = Axis {
            lo: e_lo,
            hi: e_hi,
            log: true,
            ticks: Vec::new(),
        };
        let stride = ((e_hi - e_lo) / 10.0).ceil().max(1.0);
        let mut e = e_lo;
        while e <= e_hi && e.is_finite() {
            axis.ticks.push((axis.frac(10f64.powf(e)), fmt_decade(e)));
            e += stride;
        }
        axis
    }

    /// Whether `v` can be placed on this axis.
    fn accepts(&self, v: f64) -> bool {
        v.is_finite() && (!self.log || v > 0.0)
    }

    /// Where `v` falls, from 0 (the low end) to 1 (the high end), clamped; 0 for a value the
    /// axis does not accept, so that no coordinate is ever NaN.
    fn frac(&self, v: f64) -> f64 {
        let x = if self.log { log10(v) } else { v };
        let f = (x - self.lo) / (self.hi - self.lo);
        if f.is_finite() {
            f.clamp(0.0, 1.0)
        } else {
            0.0
        }
    }
}

/// log10, with results within 1e-9 of a whole number snapped to it (log10(1000) is 3).
fn log10(v: f64) -> f64 {
    let l = v.log10();
    if (l - l.round()).abs() < 1e-9 {
        l.round()
    } else {
        l
    }
}

/// The smallest of 1, 2, 5 × 10^k at least `raw` (1 for a `raw` that is not positive).
fn nice_step(raw: f64) -> f64 {
    if !(raw.is_finite() && raw > 0.0) {
        return 1.0;
    }
    let magnitude = 10f64.powf(raw.log10().floor());
    let f = raw / magnitude;
    let nice = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * magnitude
}

/// A gridline label: as many decimals as the step needs; with `big`, in k/M/G/T.
fn fmt_tick(v: f64, step: f64, big: bool) -> String {
    let (div, suffix) = if !big {
        (1.0, "")
    } else if v.abs().max(step) >= 1e12 {
        (1e12, "T")
    } else if v.abs().max(step) >= 1e9 {
        (1e9, "G")
    } else if v.abs().max(step) >= 1e6 {
        (1e6, "M")
    } else {
        (1e3, "k")
    };
    let decimals = (-(log10(step / div)).floor()).clamp(0.0, 12.0) as usize;
    let s = format!("{:.*}", decimals, v / div + 0.0);
    let s = if s.starts_with('-') && s.trim_start_matches(['-', '0', '.']).is_empty() {
        s[1..].to_owned()
    } else {
        s
    };
    format!("{s}{suffix}")
}

/// 10^e as a gridline label: 0.01, 1, 100, 10k, 1M, or 1e-5 / 1e18 beyond the prefixes.
fn fmt_decade(e: f64) -> String {
    let e = e as i32;
    match e {
        -3..=-1 => format!("0.{}1", "0".repeat((-e - 1) as usize)),
        0..=2 => format!("1{}", "0".repeat(e as usize)),
        3..=14 => {
            let (suffix, base) = match e {
                3..=5 => ("k", 3),
                6..=8 => ("M", 6),
                9..=11 => ("G", 9),
                _ => ("T", 12),
            };
            format!("1{}{suffix}", "0".repeat((e - base) as usize))
        }
        _ => format!("1e{e}"),
    }
}

/// A value printed on the chart: about three significant digits.
fn fmt_value(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else if a == 0.0 {
        "0".to_owned()
    } else if a >= 1e-9 {
        let decimals = (2.0 - a.log10().floor()) as usize;
        format!("{v:.decimals$}")
    } else {
        format!("{v:.2e}")
    }
}

/// "1 bar", "3 bars".
fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// A coordinate: one decimal at most; 0 for a non-finite value (never expected: callers only
/// place values their axis accepts, and [`Axis::frac`] is always finite).
fn num(v: f64) -> String {
    let v = if v.is_finite() { v } else { 0.0 };
    let s = format!("{v:.1}");
    let s = s.strip_suffix(".0").unwrap_or(&s);
    if s == "-0" {
        "0".to_owned()
    } else {
        s.to_owned()
    }
}

/// `s`, shortened to `max` characters with a trailing "…" if longer.
fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

/// `s` made safe as XML text or a double- or single-quoted attribute value: markup characters
/// escaped, whitespace control characters turned into spaces, and characters XML 1.0 does not
/// allow at all replaced with U+FFFD.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(' '),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

/// A `<text>` element at (x, y) with extra (already well-formed) attributes and escaped content.
fn text(out: &mut String, x: f64, y: f64, attrs: &str, content: &str) {
    let sep = if attrs.is_empty() { "" } else { " " };
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}"{sep}{attrs}>{}</text>"#,
        num(x),
        num(y),
        escape(content)
    );
}

/// A 1 px line.
fn line(out: &mut String, a: (f64, f64), b: (f64, f64), stroke: &str) {
    line_styled(out, a, b, stroke, "1");
}

fn line_styled(out: &mut String, a: (f64, f64), b: (f64, f64), stroke: &str, width: &str) {
    let _ = writeln!(
        out,
        r#"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="{stroke}" stroke-width="{width}"/>"#,
        num(a.0),
        num(a.1),
        num(b.0),
        num(b.1)
    );
}

/// The marker of series `i` centred on (x, y): circle, square, triangle or diamond.
fn marker(out: &mut String, i: usize, x: f64, y: f64, fill: &str) {
    let polygon = |pts: &[(f64, f64)]| {
        let pts: Vec<String> = pts
            .iter()
            .map(|&(dx, dy)| format!("{},{}", num(x + dx), num(y + dy)))
            .collect();
        format!(r#"<polygon points="{}" fill="{fill}"/>"#, pts.join(" "))
    };
    let element = match i % 4 {
        0 => format!(
            r#"<circle cx="{}" cy="{}" r="3.5" fill="{fill}"/>"#,
            num(x),
            num(y)
        ),
        1 => format!(
            r#"<rect x="{}" y="{}" width="7" height="7" fill="{fill}"/>"#,
            num(x - 3.5),
            num(y - 3.5)
        ),
        2 => polygon(&[(0.0, -4.5), (4.5, 3.5), (-4.5, 3.5)]),
        _ => polygon(&[(0.0, -5.0), (5.0, 0.0), (0.0, 5.0), (-5.0, 0.0)]),
    };
    out.push_str(&element);
    out.push('\n');
}

/// The whole document: prolog, root element, white background, title, then `body`.
fn document(title: &str, height: f64, body: &str) -> String {
    let h = num(height.ceil());
    let mut out = String::with_capacity(body.len() + 600);
    out.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        out,
        r##"<svg xmlns="http://www.w3.org/2000/svg" version="1.1" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="Helvetica, Arial, sans-serif" font-size="12" fill="#222222">"##,
        w = num(WIDTH)
    );
    let _ = writeln!(out, "<title>{}</title>", escape(title));
    let _ = writeln!(
        out,
        r##"<rect x="0" y="0" width="{w}" height="{h}" fill="#ffffff"/>"##,
        w = num(WIDTH)
    );
    text(
        &mut out,
        10.0,
        26.0,
        r#"font-size="16" font-weight="bold""#,
        title,
    );
    out.push_str(body);
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks that `svg` is well-formed XML as far as these charts go (an optional XML
    /// declaration, one root element, balanced and properly nested tags, quoted and unique
    /// attributes, no raw `<`, `>` or stray `&` in text or attribute values) and that every
    /// coordinate attribute is a finite number. Returns the root element's start tag.
    fn check_svg(svg: &str) -> String {
        let mut rest = svg;
        if let Some(r) = rest.strip_prefix("<?xml") {
            let end = r.find("?>").expect("unterminated XML declaration");
            rest = &r[end + 2..];
        }
        let mut stack: Vec<&str> = Vec::new();
        let mut root: Option<String> = None;
        loop {
            let lt = rest.find('<');
            let chars = &rest[..lt.unwrap_or(rest.len())];
            check_chars(chars);
            if stack.is_empty() {
                assert!(chars.trim().is_empty(), "text outside the root: {chars:?}");
            }
            let Some(lt) = lt else { break };
            rest = &rest[lt..];
            let gt = rest.find('>').expect("unterminated tag");
            let tag = &rest[1..gt];
            rest = &rest[gt + 1..];
            if let Some(name) = tag.strip_prefix('/') {
                let open = stack.pop().expect("end tag without a start tag");
                assert_eq!(open, name.trim(), "mismatched end tag");
                continue;
            }
            assert!(!tag.starts_with(['!', '?']), "unexpected markup <{tag}>");
            let (inner, empty) = match tag.strip_suffix('/') {
                Some(inner) => (inner, true),
                None => (tag, false),
            };
            let name_end = inner.find(char::is_whitespace).unwrap_or(inner.len());
            let name = &inner[..name_end];
            assert!(
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
                "bad element name in <{tag}>"
            );
            check_attrs(&inner[name_end..]);
            if stack.is_empty() {
                assert!(root.is_none(), "more than one root element");
                root = Some(inner.to_owned());
            }
            if !empty {
                stack.push(name);
            }
        }
        assert!(stack.is_empty(), "unclosed elements: {stack:?}");
        root.expect("no root element")
    }

    /// Text or an attribute value: no markup characters, only known entities.
    fn check_chars(s: &str) {
        assert!(
            !s.contains(['<', '>', '"']),
            "raw markup character in {s:?}"
        );
        for (i, _) in s.match_indices('&') {
            let entity = &s[i + 1..s[i..].find(';').expect("unterminated entity") + i];
            assert!(
                ["amp", "lt", "gt", "quot", "apos"].contains(&entity)
                    || entity
                        .strip_prefix('#')
                        .is_some_and(|d| d.parse::<u32>().is_ok()),
                "unknown entity &{entity};"
            );
        }
    }

    fn check_attrs(mut s: &str) {
        let mut seen = Vec::new();
        loop {
            s = s.trim_start();
            if s.is_empty() {
                break;
            }
            let eq = s.find('=').expect("attribute without a value");
            let name = &s[..eq];
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-:".contains(c)),
                "bad attribute name {name:?}"
            );
            assert!(!seen.contains(&name), "duplicate attribute {name}");
            seen.push(name);
            let value_and_rest = s[eq + 1..].strip_prefix('"').expect("unquoted attribute");
            let end = value_and_rest.find('"').expect("unterminated attribute");
            let value = &value_and_rest[..end];
            check_chars(value);
            if [
                "x", "y", "width", "height", "cx", "cy", "r", "x1", "y1", "x2", "y2",
            ]
            .contains(&name)
            {
                let v: f64 = value.parse().unwrap_or_else(|_| panic!("{name}={value:?}"));
                assert!(v.is_finite(), "{name}={value:?}");
            }
            if name == "points" {
                for v in value.split([' ', ',']) {
                    let v: f64 = v.parse().unwrap_or_else(|_| panic!("points={value:?}"));
                    assert!(v.is_finite(), "points={value:?}");
                }
            }
            s = &value_and_rest[end + 1..];
        }
    }

    /// The value of attribute `name` in a start tag's text.
    fn attr<'a>(tag: &'a str, name: &str) -> &'a str {
        let start = tag
            .find(&format!(" {name}=\""))
            .unwrap_or_else(|| panic!("no {name} in {tag}"))
            + name.len()
            + 3;
        let len = tag[start..].find('"').expect("unterminated attribute");
        &tag[start..start + len]
    }

    /// The bars drawn, in document order: (x, width, fill).
    fn bars_drawn(svg: &str) -> Vec<(f64, f64, String)> {
        svg.lines()
            .filter(|l| l.starts_with("<rect class=\"bar\""))
            .map(|l| {
                (
                    attr(l, "x").parse().unwrap(),
                    attr(l, "width").parse().unwrap(),
                    attr(l, "fill").to_owned(),
                )
            })
            .collect()
    }

    fn bar(group: &str, label: &str, value: f64) -> Bar {
        Bar {
            group: group.to_owned(),
            label: label.to_owned(),
            value,
        }
    }

    fn series(name: &str, points: &[(f64, f64)]) -> Series {
        Series {
            name: name.to_owned(),
            points: points.to_vec(),
        }
    }

    #[test]
    fn documents_are_standalone_svg() {
        let charts = [
            bar_chart(
                "Rule updates",
                "ms",
                &[
                    bar("1k Services", "ferrox", 3.0),
                    bar("1k Services", "iptables", 40.0),
                ],
                false,
            ),
            bar_chart("Empty", "", &[], true),
            line_chart(
                "Latency",
                "Services",
                "µs",
                &[
                    series("ferrox", &[(1.0, 2.0), (10.0, 3.0)]),
                    series("kube-proxy", &[]),
                ],
                true,
            ),
            line_chart("Empty", "x", "y", &[], false),
            line_chart("Flat", "x", "y", &[series("a", &[(5.0, 0.0)])], false),
        ];
        for svg in &charts {
            let root = check_svg(svg);
            assert!(root.starts_with("svg "), "{root}");
            assert_eq!(attr(&root, "xmlns"), "http://www.w3.org/2000/svg");
            assert_eq!(attr(&root, "version"), "1.1");
            assert_eq!(attr(&root, "width"), "800");
            let h: f64 = attr(&root, "height").parse().unwrap();
            assert!(h > 100.0, "{h}");
            assert_eq!(attr(&root, "viewBox"), format!("0 0 800 {}", num(h)));
            assert!(attr(&root, "font-family").ends_with("sans-serif"));
            assert!(
                !svg.contains("href") && !svg.contains("url("),
                "external reference"
            );
        }
    }

    #[test]
    fn bar_width_is_proportional_to_value() {
        let svg = bar_chart("t", "ms", &[bar("", "a", 1.0), bar("", "b", 2.0)], false);
        check_svg(&svg);
        let drawn = bars_drawn(&svg);
        assert_eq!(drawn.len(), 2);
        let (w1, w2) = (drawn[0].1, drawn[1].1);
        assert!(w1 > 50.0, "{w1}");
        assert!((w2 - 2.0 * w1).abs() <= 1.0, "{w1} {w2}");
        assert_eq!(drawn[0].0, drawn[1].0, "bars start at the same x");
        assert!(svg.contains(">1.00 ms</text>") && svg.contains(">2.00 ms</text>"));
        assert!(svg.contains("Bars in ms, linear scale."));

        // log requested, but 2x is not a span worth a log scale.
        let svg = bar_chart("t", "ms", &[bar("", "a", 1.0), bar("", "b", 2.0)], true);
        let drawn = bars_drawn(&svg);
        assert!((drawn[1].1 - 2.0 * drawn[0].1).abs() <= 1.0);
        assert!(svg.contains("linear scale (values span 100× or less)"));
    }

    #[test]
    fn text_is_escaped() {
        let svg = bar_chart(
            "a \"quoted\" & 'x' <title>",
            "<u>",
            &[bar("<g>", "<&>", 1.0)],
            false,
        );
        check_svg(&svg);
        assert!(svg.contains(">&lt;&amp;&gt;</text>"));
        assert!(
            svg.contains("<title>a &quot;quoted&quot; &amp; &apos;x&apos; &lt;title&gt;</title>")
        );
        assert!(svg.contains(">&lt;g&gt;</text>"));
        assert!(svg.contains("1.00 &lt;u&gt;"));
        assert!(!svg.contains("<&>") && !svg.contains("<u>") && !svg.contains("<g>"));

        let svg = line_chart("<t>", "&x", "'y'", &[series("a<b", &[(1.0, 1.0)])], false);
        check_svg(&svg);
        assert!(svg.contains(">a&lt;b</text>") && svg.contains(">&amp;x</text>"));
        assert!(svg.contains(">&apos;y&apos;</text>"));

        assert_eq!(escape("a\u{0}b\tc\u{FFFF}"), "a\u{FFFD}b c\u{FFFD}");
    }

    #[test]
    fn same_label_same_colour_across_groups() {
        let bars = [
            bar("1k Services", "ferrox", 1.0),
            bar("1k Services", "iptables", 2.0),
            bar("10k Services", "iptables", 20.0),
            bar("10k Services", "ferrox", 1.5),
            bar("10k Services", "ipvs", 3.0),
        ];
        let svg = bar_chart("t", "ms", &bars, false);
        check_svg(&svg);
        let fills: Vec<String> = bars_drawn(&svg).into_iter().map(|b| b.2).collect();
        assert_eq!(fills.len(), 5);
        assert_eq!(fills[0], fills[3], "ferrox");
        assert_eq!(fills[1], fills[2], "iptables");
        assert_ne!(fills[0], fills[1]);
        assert_ne!(fills[4], fills[0]);
        assert_ne!(fills[4], fills[1]);
        // Group headings, in order of first appearance.
        let first = svg.find(">1k Services<").unwrap();
        let second = svg.find(">10k Services<").unwrap();
        assert!(first < second);
    }

    #[test]
    fn nan_and_infinity_are_skipped_and_noted() {
        let bars = [
            bar("g", "a", f64::NAN),
            bar("g", "b", 2.0),
            bar("g", "c", f64::INFINITY),
            bar("g", "d", f64::NEG_INFINITY),
        ];
        for log in [false, true] {
            let svg = bar_chart("t", "ms", &bars, log);
            check_svg(&svg);
            assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
            assert_eq!(bars_drawn(&svg).len(), 1);
            assert!(svg.contains("3 bars without a finite value not drawn."));
        }
        let svg = bar_chart("t", "ms", &[bar("", "a", f64::NAN)], false);
        check_svg(&svg);
        assert!(!svg.contains("NaN") && bars_drawn(&svg).is_empty());

        let svg = line_chart(
            "t",
            "x",
            "y",
            &[series(
                "a",
                &[
                    (1.0, f64::NAN),
                    (10.0, 1.0),
                    (f64::INFINITY, 2.0),
                    (100.0, 2.0),
                    (0.0, 1.0),
                ],
            )],
            true,
        );
        check_svg(&svg);
        assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
        assert!(svg.contains("2 points without finite coordinates not drawn."));
        assert!(svg.contains("1 point with x ≤ 0 not drawn on the log axis."));
        assert_eq!(
            svg.matches("<circle ").count(),
            2 + 1,
            "two points and the legend"
        );
    }

    #[test]
    fn log_scale_bars_are_evenly_spaced_by_decade() {
        let bars = [
            bar("", "a", 10.0),
            bar("", "b", 1000.0),
            bar("", "c", 100_000.0),
        ];
        let svg = bar_chart("t", "ops/s", &bars, true);
        check_svg(&svg);
        assert!(svg.contains("Bars in ops/s, log scale"));
        let ends: Vec<f64> = bars_drawn(&svg).iter().map(|b| b.0 + b.1).collect();
        assert_eq!(ends.len(), 3);
        let (d1, d2) = (ends[1] - ends[0], ends[2] - ends[1]);
        assert!(d1 > 100.0, "{ends:?}");
        assert!((d1 - d2).abs() <= 1.0, "{ends:?}");
        // Decade gridlines, labelled.
        for label in [">10<", ">100<", ">1k<", ">10k<", ">100k<"] {
            assert!(svg.contains(label), "{label}");
        }

        // A value ≤ 0 cannot be placed on a log scale: kept as a row, noted, not drawn.
        let mut with_zero = bars.to_vec();
        with_zero.push(bar("", "z", 0.0));
        let svg = bar_chart("t", "ops/s", &with_zero, true);
        check_svg(&svg);
        assert_eq!(bars_drawn(&svg).len(), 3);
        assert!(svg.contains("1 bar ≤ 0 not drawn on the log scale."));
        assert!(svg.contains(">0 ops/s (not drawn on the log scale)<"));
    }

    #[test]
    fn line_chart_log_x_is_evenly_spaced_by_decade() {
        let svg = line_chart(
            "t",
            "Services",
            "ms",
            &[
                series("a", &[(1000.0, 2.0), (10.0, 1.0), (100_000.0, 4.0)]),
                series("b", &[(10.0, 0.5), (100_000.0, 1.0)]),
            ],
            true,
        );
        check_svg(&svg);
        let cx: Vec<f64> = svg
            .lines()
            .filter(|l| l.starts_with("<circle "))
            .map(|l| attr(l, "cx").parse().unwrap())
            .collect();
        // Series "a" is drawn in x order; then its legend marker.
        assert_eq!(cx.len(), 4);
        assert!((cx[1] - cx[0] - (cx[2] - cx[1])).abs() <= 1.0, "{cx:?}");
        assert!(cx[1] - cx[0] > 100.0);
        // y from 0: the lowest y of "b" (0.5) sits above the x axis, the max at or below the top.
        let cy: Vec<f64> = svg
            .lines()
            .filter(|l| l.starts_with("<circle "))
            .map(|l| attr(l, "cy").parse().unwrap())
            .collect();
        assert!(cy[2] < cy[1] && cy[1] < cy[0], "{cy:?}");
        assert_eq!(svg.matches("<polyline ").count(), 2);
        assert!(
            svg.contains(">a</text>") && svg.contains(">b</text>"),
            "legend"
        );
        assert!(svg.contains(">Services (log scale)</text>"));
        assert!(svg.contains(">0</text>"), "y axis starts at 0");
    }

    #[test]
    fn line_chart_linear_positions() {
        let svg = line_chart(
            "t",
            "x",
            "y",
            &[series("a", &[(0.0, 0.0), (5.0, 5.0), (10.0, 10.0)])],
            false,
        );
        check_svg(&svg);
        let circles: Vec<(f64, f64)> = svg
            .lines()
            .filter(|l| l.starts_with("<circle "))
            .take(3)
            .map(|l| {
                (
                    attr(l, "cx").parse().unwrap(),
                    attr(l, "cy").parse().unwrap(),
                )
            })
            .collect();
        let (dx1, dx2) = (circles[1].0 - circles[0].0, circles[2].0 - circles[1].0);
        let (dy1, dy2) = (circles[0].1 - circles[1].1, circles[1].1 - circles[2].1);
        assert!((dx1 - dx2).abs() <= 1.0 && dx1 > 100.0, "{circles:?}");
        assert!((dy1 - dy2).abs() <= 1.0 && dy1 > 50.0, "{circles:?}");
    }

    #[test]
    fn number_formats() {
        assert_eq!(fmt_value(1234.4), "1234");
        assert_eq!(fmt_value(12.34), "12.3");
        assert_eq!(fmt_value(1.5), "1.50");
        assert_eq!(fmt_value(0.01234), "0.0123");
        assert_eq!(fmt_value(0.0), "0");
        assert_eq!(fmt_decade(-2.0), "0.01");
        assert_eq!(fmt_decade(0.0), "1");
        assert_eq!(fmt_decade(2.0), "100");
        assert_eq!(fmt_decade(4.0), "10k");
        assert_eq!(fmt_decade(6.0), "1M");
        assert_eq!(fmt_decade(20.0), "1e20");
        assert_eq!(fmt_tick(0.4, 0.2, false), "0.4");
        assert_eq!(fmt_tick(25_000.0, 5000.0, true), "25k");
        assert_eq!(fmt_tick(2500.0, 500.0, true), "2.5k");
        assert_eq!(nice_step(0.3), 0.5);
        assert_eq!(nice_step(7.0), 10.0);
        assert_eq!(nice_step(150.0), 200.0);
        assert_eq!(num(-0.01), "0");
        assert_eq!(num(f64::NAN), "0");
        assert_eq!(shorten("abcdef", 4), "abc…");
    }
}
