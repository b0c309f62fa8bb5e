"""Anatomy every chest pipeline can ask for, computed without weights: the working grid,
the airway (trachea and main bronchi) and the left and right lungs."""
