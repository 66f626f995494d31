"""From photos to answers: the predictor interface, the baselines, the trained-model predictor, the
exported model and geoloc-predict."""
