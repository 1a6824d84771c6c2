"""parityport"""
