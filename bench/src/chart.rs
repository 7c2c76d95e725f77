//! The forward suite's results at a glance: an SVG bar chart of each throughput row's ratio to a
//! direct connection, one bar per target (`--chart FILE`), written from the same medians as the
//! table.

use std::fmt::Write as _;

use crate::Row;

const ROW_HEIGHT: f64 = 14.0;
const LABEL_WIDTH: f64 = 330.0;
const PLOT_WIDTH: f64 = 420.0;
const COLOURS: [&str; 8] = ["#1b6ca8", "#e07b39", "#4a9c5d", "#b5484b", "#7d5ba6", "#8c6d31", "#d4a017", "#5f5f5f"];

/// Escapes text for SVG.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The chart of `rows` (only those where higher is better and a direct baseline exists) for the
/// targets `names`, bars scaled to the largest ratio (at least 1.0, the direct connection).
pub(crate) fn svg(names: &[&str], rows: &[Row]) -> Option<String> {
    let direct = names.iter().position(|n| *n == "direct")?;
    let others: Vec<(usize, &str)> = names.iter().copied().enumerate().filter(|(i, _)| *i != direct).collect();
    let shown: Vec<(&Row, Vec<f64>)> = rows
        .iter()
        .filter(|r| r.higher_better)
        .filter_map(|r| {
            let d = *r.values.get(direct)?;
            (d.is_finite() && d > 0.0).then(|| (r, others.iter().map(|(i, _)| r.values[*i] / d).collect()))
        })
        .collect();
    if shown.is_empty() {
        return None;
    }
    let max = shown.iter().flat_map(|(_, v)| v.iter().copied()).filter(|v| v.is_finite()).fold(1.0_f64, f64::max);
    let group = ROW_HEIGHT * others.len() as f64 + 10.0;
    let legend = 18.0 * others.len() as f64 + 10.0;
    let height = 40.0 + group * shown.len() as f64 + legend;
    let width = LABEL_WIDTH + PLOT_WIDTH + 60.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(
        out,
        r#"<text x="4" y="16" font-size="13">Throughput as a share of a direct connection (higher is better)</text>"#
    );
    let x0 = LABEL_WIDTH;
    let one = x0 + PLOT_WIDTH / max;
    let _ = writeln!(
        out,
        r##"<line x1="{one}" y1="24" x2="{one}" y2="{}" stroke="#999" stroke-dasharray="3,3"/><text x="{one}" y="34" text-anchor="middle" fill="#666">direct = 1</text>"##,
        40.0 + group * shown.len() as f64
    );
    for (k, (row, ratios)) in shown.iter().enumerate() {
        let top = 40.0 + group * k as f64;
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
            x0 - 6.0,
            top + group / 2.0,
            esc(&row.scenario)
        );
        for (j, ratio) in ratios.iter().enumerate() {
            if !ratio.is_finite() {
                continue;
            }
            let y = top + ROW_HEIGHT * j as f64;
            let w = (PLOT_WIDTH * ratio / max).max(1.0);
            let colour = COLOURS[j % COLOURS.len()];
            let _ = writeln!(
                out,
                r#"<rect x="{x0}" y="{y}" width="{w:.1}" height="{}" fill="{colour}"/><text x="{:.1}" y="{}">{ratio:.2}</text>"#,
                ROW_HEIGHT - 2.0,
                x0 + w + 3.0,
                y + ROW_HEIGHT - 4.0
            );
        }
    }
    let ly = 40.0 + group * shown.len() as f64 + 10.0;
    for (j, (_, name)) in others.iter().enumerate() {
        let y = ly + 18.0 * j as f64;
        let colour = COLOURS[j % COLOURS.len()];
        let _ = writeln!(
            out,
            r#"<rect x="{x0}" y="{y}" width="12" height="12" fill="{colour}"/><text x="{}" y="{}">{}</text>"#,
            x0 + 18.0,
            y + 10.0,
            esc(name)
        );
    }
    out.push_str("</svg>\n");
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throughput_rows_become_bars_scaled_to_direct() {
        let rows = vec![
            Row { scenario: "setup (tunnels/s)".into(), higher_better: true, values: vec![100.0, 40.0, f64::NAN] },
            Row { scenario: "setup p50 (us)".into(), higher_better: false, values: vec![10.0, 20.0, 30.0] },
        ];
        let drawn = svg(&["direct", "tunnelgate", "squid"], &rows).unwrap_or_default();
        assert!(drawn.contains(">setup (tunnels/s)</text>") && drawn.contains(">0.40</text>"), "{drawn}");
        assert!(!drawn.contains("p50"), "only rows where higher is better");
        assert!(drawn.contains(">tunnelgate</text>") && drawn.contains(">squid</text>"));
        assert!(svg(&["tunnelgate"], &rows).is_none(), "no direct baseline, no chart");
    }
}
