"""Metrics: classification reports, mergeable score summaries and confidence intervals.

This package imports no other part of pneumofed, so sites and server agree on one definition of
every number they exchange.
"""
