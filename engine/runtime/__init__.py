"""Running the network: settings, precision, validation, compiled artifacts, backends, staging and the predictor."""
