"""moeray.router"""
