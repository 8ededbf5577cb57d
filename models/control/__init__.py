"""Control: ControlNet, T2I-Adapter and GLIGEN conditions (issue work in progress: the preprocessors)."""
