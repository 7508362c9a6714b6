// bitfold UART streaming wrapper (Verilog-2005): 8N1 UART <-> the dataflow core's streams.
// Each input element is one byte (its low IBITS bits are the code); each output element is sent
// as OBYTES bytes, little-endian, two's complement. The host sends one frame and reads its
// outputs before sending the next (bitfold run-fpga does this), so a one-byte holding register
// is enough on the receive side.
module bf_uart_rx #(parameter CLKS_PER_BIT = 217) (
  input wire clk, input wire rst, input wire rx,
  output reg valid, output reg [7:0] data
);
  reg [1:0] sync;
  reg [$clog2(CLKS_PER_BIT + 1):0] cnt;
  reg [3:0] bitn;
  reg busy;
  reg [7:0] sh;
  always @(posedge clk) begin
    sync <= {sync[0], rx};
    valid <= 1'b0;
    if (rst) begin
      busy <= 1'b0; cnt <= 0; bitn <= 0; sync <= 2'b11;
    end else if (!busy) begin
      if (!sync[1]) begin busy <= 1'b1; cnt <= CLKS_PER_BIT / 2; bitn <= 0; end
    end else if (cnt != 0) begin
      cnt <= cnt - 1;
    end else begin
      cnt <= CLKS_PER_BIT - 1;
      if (bitn == 0) begin
        if (sync[1]) busy <= 1'b0;    // false start bit
        bitn <= 1;
      end else if (bitn <= 8) begin
        sh <= {sync[1], sh[7:1]};
        bitn <= bitn + 1;
      end else begin
        busy <= 1'b0;
        if (sync[1]) begin valid <= 1'b1; data <= sh; end   // stop bit ok
      end
    end
  end
endmodule

module bf_uart_tx #(parameter CLKS_PER_BIT = 217) (
  input wire clk, input wire rst,
  input wire valid, output wire ready, input wire [7:0] data,
  output wire tx
);
  reg [9:0] sh;
  reg [3:0] left;
  reg [$clog2(CLKS_PER_BIT + 1):0] cnt;
  assign ready = (left == 0);
  assign tx = (left == 0) ? 1'b1 : sh[0];
  always @(posedge clk) begin
    if (rst) begin
      left <= 0; cnt <= 0; sh <= 10'h3ff;
    end else if (left == 0) begin
      if (valid) begin sh <= {1'b1, data, 1'b0}; left <= 10; cnt <= CLKS_PER_BIT - 1; end
    end else if (cnt != 0) begin
      cnt <= cnt - 1;
    end else begin
      cnt <= CLKS_PER_BIT - 1;
      sh <= {1'b1, sh[9:1]};
      left <= left - 1;
    end
  end
endmodule

module bf_uart_stream #(
  parameter CLKS_PER_BIT = 217, IBITS = 8, OBITS = 16, OSIGNED = 1
) (
  input wire clk, input wire rst, input wire rx, output wire tx,
  output wire in_valid, input wire in_ready, output wire [IBITS-1:0] in_data,
  input wire out_valid, output wire out_ready, input wire [OBITS-1:0] out_data
);
  localparam OBYTES = (OBITS + 7) / 8;
  wire rv; wire [7:0] rd;
  reg held; reg [7:0] hbyte;
  bf_uart_rx #(.CLKS_PER_BIT(CLKS_PER_BIT)) urx (.clk(clk), .rst(rst), .rx(rx), .valid(rv), .data(rd));
  assign in_valid = held;
  assign in_data = hbyte[IBITS-1:0];
  always @(posedge clk) begin
    if (rst) held <= 1'b0;
    else begin
      if (held && in_ready) held <= 1'b0;
      if (rv) begin held <= 1'b1; hbyte <= rd; end
    end
  end

  // output serializer: latch one element, send OBYTES bytes, then accept the next
  reg [OBYTES*8-1:0] oval;
  reg [3:0] obytes_left;
  wire tready;
  wire tvalid = (obytes_left != 0);
  assign out_ready = (obytes_left == 0);
  bf_uart_tx #(.CLKS_PER_BIT(CLKS_PER_BIT)) utx (.clk(clk), .rst(rst), .valid(tvalid), .ready(tready),
                                                .data(oval[7:0]), .tx(tx));
  always @(posedge clk) begin
    if (rst) obytes_left <= 0;
    else if (obytes_left == 0) begin
      if (out_valid) begin
        oval <= {{(OBYTES*8){OSIGNED ? out_data[OBITS-1] : 1'b0}}, out_data};
        obytes_left <= OBYTES;
      end
    end else if (tready) begin
      oval <= oval >> 8;
      obytes_left <= obytes_left - 1;
    end
  end
endmodule
