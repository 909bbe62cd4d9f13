//! Policy files: raw model, compilation and decisions.
