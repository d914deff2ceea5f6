"""The churn service: customer knowledge (RFM, rhythm, models, LTV) and churn alerts."""
