"""Metrics as plain functions of arrays: ranking (recall, NDCG at K) and classification (ROC AUC,
calibration). Imports nothing else from dmp_dl."""
