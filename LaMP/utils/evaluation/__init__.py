"""The official metrics (classification, rating, ROUGE), bootstrap intervals, and scoring
prediction files against golds."""
