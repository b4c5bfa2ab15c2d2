//! The evaluation log of a run: a CSV file (one row per evaluation) and a PNG loss curve.

use std::path::Path;

use candle::{bail, Result};
use plotters::prelude::*;

use crate::train::write_atomically;

/// Header of the CSV log.
pub const CSV_HEADER: &str = "step,train_loss,val_loss,val_bpc,lr,tokens_per_sec";

/// One evaluation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvalRecord {
    /// Optimizer steps done when evaluating.
    pub step: usize,
    /// Mean training-split loss (nats per character).
    pub train_loss: f64,
    /// Mean validation-split loss (nats per character).
    pub val_loss: f64,
    /// Learning rate of the last step.
    pub lr: f64,
    /// Training throughput since the previous evaluation.
    pub tokens_per_sec: f64,
}

impl EvalRecord {
    /// Validation bits per character (`val_loss / ln 2`).
    pub fn val_bpc(&self) -> f64 {
        self.val_loss / std::f64::consts::LN_2
    }
}

/// Reads a CSV log written by [`write_csv`]; a missing file is an empty log.
pub fn read_csv(path: &Path) -> Result<Vec<EvalRecord>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => bail!("cannot read {}: {e}", path.display()),
    };
    let mut lines = text.lines();
    if lines.next() != Some(CSV_HEADER) {
        bail!(
            "{} is not a training log (expected header {CSV_HEADER:?})",
            path.display()
        )
    }
    lines
        .enumerate()
        .map(|(i, line)| {
            let f: Vec<&str> = line.split(',').collect();
            let bad = || {
                candle::Error::Msg(format!(
                    "{} line {}: cannot parse {line:?}",
                    path.display(),
                    i + 2
                ))
            };
            if f.len() != 6 {
                return Err(bad());
            }
            let num = |s: &str| s.parse::<f64>().map_err(|_| bad());
            Ok(EvalRecord {
                step: f[0].parse().map_err(|_| bad())?,
                train_loss: num(f[1])?,
                val_loss: num(f[2])?,
                lr: num(f[4])?,
                tokens_per_sec: num(f[5])?,
            })
        })
        .collect()
}

/// Writes the whole log atomically.
pub fn write_csv(path: &Path, records: &[EvalRecord]) -> Result<()> {
    let mut text = format!("{CSV_HEADER}\n");
    for r in records {
        text.push_str(&format!(
            "{},{:.6},{:.6},{:.6},{:.3e},{:.1}\n",
            r.step,
            r.train_loss,
            r.val_loss,
            r.val_bpc(),
            r.lr,
            r.tokens_per_sec
        ));
    }
    write_atomically(path, |tmp| {
        std::fs::write(tmp, text).map_err(candle::Error::from)
    })
}

/// Registers a system sans-serif font for chart text; false when none is found (the chart is
/// then drawn without text).
fn register_system_font() -> bool {
    static FONT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FONT.get_or_init(|| {
        const CANDIDATES: [&str; 6] = [
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/TTF/DejaVuSans.ttf",
            "/usr/share/fonts/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
            "/System/Library/Fonts/Supplemental/Arial.ttf",
            "C:\\Windows\\Fonts\\arial.ttf",
        ];
        CANDIDATES.iter().any(|p| match std::fs::read(p) {
            Ok(bytes) => {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
            }
            Err(_) => false,
        })
    })
}

/// Draws train and validation loss against the step into a PNG at `path` (atomically).
pub fn plot_losses(path: &Path, records: &[EvalRecord]) -> Result<()> {
    if records.is_empty() {
        bail!("no evaluations to plot")
    }
    let series = |f: fn(&EvalRecord) -> f64| -> Vec<(f64, f64)> {
        records.iter().map(|r| (r.step as f64, f(r))).collect()
    };
    plot_series(
        path,
        "loss (nats/char)",
        ("step", "loss"),
        &[
            ("train".to_string(), series(|r| r.train_loss)),
            ("val".to_string(), series(|r| r.val_loss)),
        ],
    )
}

/// Draws named `(x, y)` line series into a PNG at `path` (atomically), one colour each, with a
/// legend. `axes` are the x and y descriptions. Text needs a system font (drawn without otherwise).
pub fn plot_series(
    path: &Path,
    title: &str,
    axes: (&str, &str),
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<()> {
    let points = || series.iter().flat_map(|(_, s)| s.iter().copied());
    if points().next().is_none() {
        bail!("no points to plot into {}", path.display())
    }
    let err =
        |e: &dyn std::fmt::Display| candle::Error::Msg(format!("plotting {}: {e}", path.display()));
    let with_text = register_system_font();
    let range = |pick: fn((f64, f64)) -> f64| {
        let (lo, hi) = points()
            .map(pick)
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                (lo.min(v), hi.max(v))
            });
        let pad = ((hi - lo) * 0.05).max(1e-3);
        (lo - pad)..(hi + pad)
    };
    write_atomically(path, |tmp| {
        let root = BitMapBackend::new(tmp, (900, 600)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let mut builder = ChartBuilder::on(&root);
        builder.margin(20);
        if with_text {
            builder
                .caption(title, ("sans-serif", 24))
                .x_label_area_size(40)
                .y_label_area_size(60);
        }
        let mut chart = builder
            .build_cartesian_2d(range(|p| p.0), range(|p| p.1))
            .map_err(|e| err(&e))?;
        let mut mesh = chart.configure_mesh();
        if with_text {
            mesh.x_desc(axes.0).y_desc(axes.1);
        } else {
            mesh.disable_x_axis().disable_y_axis();
        }
        mesh.draw().map_err(|e| err(&e))?;
        for (i, (label, points)) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let drawn = chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(|e| err(&e))?;
            if with_text {
                drawn
                    .label(label.as_str())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            }
        }
        if with_text {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(|e| err(&e))?;
        }
        root.present().map_err(|e| err(&e))?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_round_trips_and_plot_is_written() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let records: Vec<EvalRecord> = (0..4)
            .map(|i| EvalRecord {
                step: i * 10,
                train_loss: 3.0 - i as f64 * 0.3,
                val_loss: 3.1 - i as f64 * 0.25,
                lr: 1e-3,
                tokens_per_sec: 1234.5,
            })
            .collect();
        let csv = dir.path().join("log.csv");
        write_csv(&csv, &records)?;
        let back = read_csv(&csv)?;
        assert_eq!(back.len(), 4);
        assert_eq!(back[3].step, 30);
        assert!((back[3].val_loss - records[3].val_loss).abs() < 1e-6);
        let png = dir.path().join("loss.png");
        plot_losses(&png, &records)?;
        assert!(std::fs::metadata(&png)?.len() > 1000);
        Ok(())
    }
}
