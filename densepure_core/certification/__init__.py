"""Certification statistics: from vote counts to certified radii, with a guarantee at level alpha.

``stats`` holds the fixed-sample-size bound (Cohen et al.'s CERTIFY and PREDICT from counts,
one-sided Clopper-Pearson, radii, certified accuracy, binomial tests); ``sequential`` the
adaptive sample size (anytime-valid bounds at every look, the stopping rule).

Pure numpy/scipy: imports nothing else of the project.
"""
