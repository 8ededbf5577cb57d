"""ShapesWorld: seeded scenes of coloured shapes (`world`) and a classical image oracle (`oracle`)."""
