"""Backend health: pure rise/fall and passive-ejection state, checks, and their scheduler."""
