//! Plain-text tables as kubectl and istioctl print them.

use std::fmt::Write as _;

/// Left-aligned columns, three spaces apart, as istioctl and kubectl print.
pub fn columns(rows: &[Vec<String>]) -> String {
    let mut widths = Vec::new();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if widths.len() <= i {
                widths.push(0);
            }
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (cell, width) in row.iter().zip(&widths) {
            let _ = write!(line, "{cell:<width$}   ");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn columns_are_left_aligned_three_spaces_apart_without_trailing_blanks() {
        let rows = vec![
            vec!["NAME".to_owned(), "AGE".to_owned(), String::new()],
            vec!["httpbin".to_owned(), "5m".to_owned(), "x".to_owned()],
        ];
        assert_eq!(super::columns(&rows), "NAME      AGE\nhttpbin   5m    x\n");
    }
}
